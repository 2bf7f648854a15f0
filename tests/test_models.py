"""Models against the spec: position embedding, init, heads, names, stop-grad-conv1, errors."""

from __future__ import annotations

import math

import pytest
import torch
from helpers import TINY_VIT
from torch import nn

from moco_scale import build_moco
from moco_scale.models import UnknownArchError
from moco_scale.models.vit import build_vit, sincos_pos_embed


def test_pos_embed_layout_non_square():
    """Rows come first in the channels and patches are row-major: checked on a 2 x 3 grid."""
    h, w, dim = 2, 3, 16
    pe = sincos_pos_embed(h, w, dim)[0]
    assert pe.shape == (1 + h * w, dim)
    assert torch.all(pe[0] == 0)
    q = dim // 4
    for r in range(h):
        for c in range(w):
            k = 1 + r * w + c
            for d in range(q):
                om = 1 / 10000 ** (d / q)
                expected = [math.sin(r * om), math.cos(r * om), math.sin(c * om), math.cos(c * om)]
                got = [pe[k, d].item(), pe[k, q + d].item(), pe[k, 2 * q + d].item(), pe[k, 3 * q + d].item()]
                assert got == pytest.approx(expected, abs=1e-6), (r, c, d)
    # patch (0, 1) and (1, 0) differ exactly in which half moves
    assert torch.equal(pe[1 + 1, :2 * q], pe[1, :2 * q]) and not torch.equal(pe[1 + 1, 2 * q:], pe[1, 2 * q:])
    assert torch.equal(pe[1 + w, 2 * q:], pe[1, 2 * q:]) and not torch.equal(pe[1 + w, :2 * q], pe[1, :2 * q])


def test_vit_small_init_statistics():
    """The values models/init.py gives a built ViT-S (build_vit only constructs, e.g. on the meta device)."""
    torch.manual_seed(0)
    vit = build_moco("vit_small", moco_dim=32, moco_mlp_dim=64).base_encoder
    d = 384
    assert vit.blocks[0].attn.num_heads == 12 and len(vit.blocks) == 12 and vit.embed_dim == d
    assert vit.norm.eps == 1e-6 and vit.blocks[0].norm1.eps == 1e-6
    assert torch.equal(vit.pos_embed, sincos_pos_embed(14, 14, d)) and not vit.pos_embed.requires_grad
    qkv = vit.blocks[0].attn.qkv.weight
    a = math.sqrt(6 / (d + d))  # xavier for one D x D block of the (3D, D) weight
    assert qkv.abs().max() <= a and qkv.abs().max() > 0.99 * a
    assert qkv.std().item() == pytest.approx(a / math.sqrt(3), rel=0.02)
    fc1 = vit.blocks[3].mlp.fc1.weight
    assert fc1.abs().max() <= math.sqrt(6 / (d + 4 * d)) and fc1.std().item() == pytest.approx(
        math.sqrt(2 / (d + 4 * d)), rel=0.02)
    assert all(torch.all(m.bias == 0) for m in vit.modules() if isinstance(m, nn.Linear) and m.bias is not None)
    pw = vit.patch_embed.proj.weight
    assert pw.abs().max() <= math.sqrt(6 / (3 * 16 * 16 + d)) and torch.all(vit.patch_embed.proj.bias == 0)
    assert pw.std().item() == pytest.approx(math.sqrt(2 / (3 * 16 * 16 + d)), rel=0.02)
    assert vit.cls_token.std().item() == pytest.approx(1e-6, rel=0.3)


@pytest.mark.parametrize("arch,heads,depth", [("vit_base", 12, 12), ("vit_conv_small", 12, 11), ("vit_tiny", 3, 12)])
def test_variants(arch, heads, depth):
    vit = build_vit(arch, img_size=32)
    assert vit.blocks[0].attn.num_heads == heads and len(vit.blocks) == depth


def test_conv_stem_layout_and_stop_grad():
    vit = build_vit("vit_conv_small", img_size=64, stop_grad_conv1=True)
    convs = [m for m in vit.patch_embed.proj if isinstance(m, nn.Conv2d)]
    assert [c.out_channels for c in convs] == [48, 96, 192, 384, 384]
    assert [c.stride[0] for c in convs] == [2, 2, 2, 2, 1] and convs[-1].bias is not None
    assert all(p.requires_grad for p in vit.patch_embed.parameters())  # not applied to the conv stem
    assert vit.patch_embed.num_patches == 16


def test_heads_and_state_dict_names():
    vit = build_moco("vit_small", img_size=32, moco_dim=256, moco_mlp_dim=4096)
    shapes = [tuple(m.weight.shape) for m in vit.base_encoder.head if isinstance(m, nn.Linear)]
    assert shapes == [(4096, 384), (4096, 4096), (256, 4096)]
    assert not vit.base_encoder.head[-1].affine and not vit.predictor[-1].affine
    assert [tuple(m.weight.shape) for m in vit.predictor if isinstance(m, nn.Linear)] == [(4096, 256), (256, 4096)]
    assert all(m.bias is None for m in vit.modules() if isinstance(m, nn.Linear) and m in set(vit.predictor))
    keys = vit.state_dict().keys()
    assert {k.split(".")[0] for k in keys} == {"base_encoder", "momentum_encoder", "predictor"}
    assert "base_encoder.head.6.weight" in keys and "momentum_encoder.head.7.running_mean" in keys
    rn = build_moco("resnet50")
    assert [tuple(m.weight.shape) for m in rn.base_encoder.fc if isinstance(m, nn.Linear)] == [(4096, 2048),
                                                                                              (256, 4096)]
    assert isinstance(rn.predictor[-1], nn.Linear)  # no BN after the ResNet predictor
    assert torch.all(rn.base_encoder.layer1[0].bn3.weight == 0)  # zero-init residual
    assert "base_encoder.fc.0.weight" in rn.state_dict()


def test_momentum_encoder_is_a_frozen_copy():
    m = build_moco(**TINY_VIT)
    for (n, b), (_, k) in zip(m.base_encoder.named_parameters(), m.momentum_encoder.named_parameters(), strict=True):
        assert torch.equal(b, k) and not k.requires_grad, n
    m.update_momentum(0.9)
    with torch.no_grad():
        m.base_encoder.norm.weight.add_(1.0)
    m.update_momentum(0.9)
    torch.testing.assert_close(m.momentum_encoder.norm.weight, torch.full_like(m.base_encoder.norm.weight, 1.1))


def test_stop_grad_conv1_freezes_patch_projection():
    m = build_moco(**TINY_VIT, stop_grad_conv1=True)
    before = m.base_encoder.patch_embed.proj.weight.clone()
    x = torch.randn(4, 3, 32, 32)
    m(x, x.flip(3)).backward()
    assert m.base_encoder.patch_embed.proj.weight.grad is None
    assert m.base_encoder.blocks[0].attn.qkv.weight.grad is not None
    assert torch.equal(before, m.base_encoder.patch_embed.proj.weight)


def test_batched_views_equal_separate_views():
    torch.manual_seed(0)
    m = build_moco(**TINY_VIT)
    assert m.batch_views
    x1, x2 = torch.randn(6, 3, 32, 32), torch.randn(6, 3, 32, 32)
    batched = m(x1, x2)
    m.batch_views = False
    separate = m(x1, x2)
    torch.testing.assert_close(batched, separate, rtol=1e-6, atol=1e-6)
    assert not build_moco("vit_conv_small", img_size=32, depth=1).batch_views  # BN in the conv stem


def test_unknown_arch_lists_known():
    with pytest.raises(UnknownArchError, match="unknown architecture 'vit_gigantic'.*vit_small"):
        build_moco("vit_gigantic")
    with pytest.raises(ValueError, match="only apply to ViT"):
        build_moco("resnet50", depth=3)
