"""The MoCo v3 module: base encoder (+ projector), momentum encoder, predictor; its loss in forward."""

from __future__ import annotations

import copy
from functools import partial

import torch
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from moco_scale.loss import symmetric_loss
from moco_scale.models.batchnorm import has_batchnorm
from moco_scale.models.chunking import ChunkPhases, chunked
from moco_scale.models.init import Rule, mlp_rule, resnet_rule, vit_rule
from moco_scale.models.parts import Part, TrainModule, backbone_blocks, backbone_features, head_name, projector

ENCODERS = ("base_encoder", "momentum_encoder")


class MoCo(ChunkPhases, TrainModule):
    """Holds the three parts under the reference's names; `forward` returns the MoCo v3 loss.

    Each head runs per view, so BN statistics are per view as in the reference. A backbone
    without BN (a plain ViT) takes both views as one batch, which gives the same result and
    halves the parameter gathers of a sharded engine.
    """

    image_inputs = 2

    def __init__(self, base_encoder: nn.Module, predictor: nn.Module, temperature: float) -> None:
        super().__init__()
        self.base_encoder = base_encoder
        self.momentum_encoder = copy.deepcopy(base_encoder)
        self.momentum_encoder.requires_grad_(False)
        self.predictor = predictor
        self.temperature = temperature
        self.batch_views = not has_batchnorm(_without_head(base_encoder))
        self.backbone_chunk = 0

    # -- what engines ask (models/parts.py) -----------------------------------------------------------
    def parts(self) -> list[Part]:
        return [Part(backbone_blocks(self.base_encoder), [projector(self.base_encoder), self.predictor], True),
                Part(backbone_blocks(self.momentum_encoder), [projector(self.momentum_encoder)], False)]

    def init_rule(self, name: str) -> tuple[Rule, str]:
        """Twins share a key (the momentum encoder starts as a copy); the heads keep torch's defaults."""
        for prefix in ENCODERS:
            if name == prefix or name.startswith(f"{prefix}."):
                key = name[len(prefix) + 1:]
                head = head_name(self.base_encoder)
                if key == head or key.startswith(f"{head}."):
                    return mlp_rule, key
                return (vit_rule if isinstance(self.base_encoder, VisionTransformer)
                        else resnet_rule(self.base_encoder)), key
        return mlp_rule, name

    def trainable_named_parameters(self) -> list[tuple[str, nn.Parameter]]:
        """What the optimizer updates: base encoder and predictor, without frozen parameters."""
        return [(f"{prefix}.{n}", p) for prefix, part in (("base_encoder", self.base_encoder),
                                                           ("predictor", self.predictor))
                for n, p in part.named_parameters() if p.requires_grad]

    def momentum_pairs(self) -> list[tuple[str, nn.Parameter, nn.Parameter]]:
        """(name in the momentum encoder, momentum parameter, base parameter) for every parameter the EMA moves:
        the trainable ones (a frozen base parameter, the fixed position embedding or a stop-grad conv1, never
        changes, nor does its twin). The one pairing every engine and the planner use."""
        return [(n, m, b) for (n, m), b in zip(self.momentum_encoder.named_parameters(),
                                               self.base_encoder.parameters(), strict=True) if b.requires_grad]

    def first_layer_names(self) -> tuple[str, ...]:
        """The trainable first layer of the base encoder (ViT patch embedding, ResNet conv1), whose gradient
        norm the run logs: the instability the paper reports (loss dips) shows there first."""
        params = dict(self.named_parameters())
        return tuple(n for n in ("base_encoder.patch_embed.proj.weight", "base_encoder.conv1.weight")
                     if n in params and params[n].requires_grad)

    def set_backbone_chunk(self, chunk: int) -> None:
        """Run the backbones in chunks of `chunk` images (0: off) inside `forward`; see models/chunking.py."""
        self.check_backbone_chunk(chunk)
        self.backbone_chunk = chunk

    def check_backbone_chunk(self, chunk: int) -> None:
        if chunk < 0:
            raise ValueError(f"backbone chunk must be 0 (off) or a positive number of images, got {chunk}")
        if chunk and not self.batch_views:
            raise ValueError("--backbone-chunk needs a backbone without BatchNorm (a ViT): chunking a ResNet "
                             "would compute its BN statistics per chunk and change the result")

    # -- the algorithm ------------------------------------------------------------------------------
    @torch.no_grad()
    def update_momentum(self, m: float) -> None:
        """theta_m <- m theta_m + (1 - m) theta_b over parameters (not BN buffers), no predictor."""
        pairs = self.momentum_pairs()
        torch._foreach_lerp_([p for _, p, _ in pairs], [b for _, _, b in pairs], 1.0 - m)

    def _features(self, encoder: nn.Module, x: torch.Tensor) -> torch.Tensor:
        if not self.backbone_chunk:
            return backbone_features(encoder, x)
        in_head = {id(p) for p in projector(encoder).parameters()}
        params = [p for p in encoder.parameters() if p.requires_grad and id(p) not in in_head]
        return chunked(partial(backbone_features, encoder), x, self.backbone_chunk, params)

    def encode(self, encoder: nn.Module, x1: torch.Tensor, x2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.batch_views:
            f1, f2 = self._features(encoder, torch.cat([x1, x2])).chunk(2)
        else:
            f1, f2 = backbone_features(encoder, x1), backbone_features(encoder, x2)
        head = projector(encoder)
        return head(f1), head(f2)

    def forward(self, x1: torch.Tensor, x2: torch.Tensor, m: float | None = None) -> torch.Tensor:
        """The symmetric loss of the two views, called as the reference's module is: `model(x1, x2, m)` first
        moves the momentum encoder with m; engines update it themselves and pass no m."""
        if m is not None:
            self.update_momentum(m)
        z1, z2 = self.encode(self.base_encoder, x1, x2)
        q1, q2 = self.predictor(z1), self.predictor(z2)
        with torch.no_grad():
            k1, k2 = self.encode(self.momentum_encoder, x1, x2)
        return symmetric_loss(q1, q2, k1, k2, self.temperature)


def _without_head(encoder: nn.Module) -> list[nn.Module]:
    head = projector(encoder)
    return nn.ModuleList([m for name, m in encoder.named_children() if m is not head])
