"""Schedules against the oracle and closed forms; LARS against the spec on a hand-made example."""

from __future__ import annotations

import pytest
import torch
from helpers import TINY_VIT, build_engine
from reference import lr_at, m_at

from moco_scale import build_moco, schedules
from moco_scale.dist import DistContext
from moco_scale.engines import load_engine_config
from moco_scale.optim import LARS


def test_lr_schedule_points():
    lr = schedules.scaled_lr(1.5e-4, 4096)
    assert lr == pytest.approx(2.4e-3)
    f = lambda ep: schedules.learning_rate(ep, lr, 300, 40)
    assert f(0.0) == 0.0
    assert f(20.0) == pytest.approx(lr / 2)
    assert f(40.0) == pytest.approx(lr)  # warmup end
    assert f(170.0) == pytest.approx(lr / 2)  # cosine midpoint
    assert f(300.0) == pytest.approx(0.0, abs=1e-15)
    for ep in torch.linspace(0, 300, 97).tolist():
        assert f(ep) == pytest.approx(lr_at(ep, 1.5e-4, 4096, 300, 40), rel=1e-12, abs=1e-18)


def test_momentum_schedule_points():
    f = lambda ep: schedules.momentum(ep, 0.99, 100, True)
    assert f(0) == pytest.approx(0.99) and f(50) == pytest.approx(0.995) and f(100) == pytest.approx(1.0)
    assert schedules.momentum(37.5, 0.99, 100, False) == 0.99
    for ep in torch.linspace(0, 100, 41).tolist():
        assert f(ep) == pytest.approx(m_at(ep, 0.99, 100, True), rel=1e-12)


def test_lars_hand_example():
    w = torch.nn.Parameter(torch.tensor([[3.0, 4.0]]))  # norm 5
    b = torch.nn.Parameter(torch.tensor([1.0, -1.0]))
    z = torch.nn.Parameter(torch.zeros(2, 2))  # zero norm: ratio 1
    opt = LARS([w, b, z], lr=2.0, weight_decay=0.1, momentum=0.9, trust_coefficient=0.001)
    w.grad, b.grad, z.grad = torch.tensor([[0.3, 0.4]]), torch.tensor([0.5, 0.25]), torch.tensor([[1.0, 0], [0, 0]])
    opt.step()
    # d = g + 0.1 w = (0.6, 0.8), |d| = 1, ratio = 0.001 * 5 / 1 = 0.005 -> d = (0.003, 0.004)
    torch.testing.assert_close(w.data, torch.tensor([[3.0 - 2 * 0.003, 4.0 - 2 * 0.004]]))
    torch.testing.assert_close(b.data, torch.tensor([1.0 - 2 * 0.5, -1.0 - 2 * 0.25]))  # no wd, no trust
    torch.testing.assert_close(z.data, torch.tensor([[-2.0, 0], [0, 0]]))
    w_prev = w.data.clone()
    w.grad = torch.tensor([[0.0, 0.0]])
    opt.step()
    # d = 0.1 w; ratio = 0.001 |w| / |0.1 w| = 0.01 -> d = 0.001 w; mu = 0.9 (0.003, 0.004) + 0.001 w
    mu = 0.9 * torch.tensor([[0.003, 0.004]]) + 0.001 * w_prev
    torch.testing.assert_close(w.data, w_prev - 2 * mu)


def test_adamw_as_reference_and_only_trainable_params():
    model = build_moco(**TINY_VIT, stop_grad_conv1=True)
    engine = build_engine(model, "adamw", 0.1, load_engine_config(None), DistContext(0, 1, 0, 1, torch.device("cpu")))
    group = engine.optimizer.param_groups[0]
    assert group["betas"] == (0.9, 0.999) and group["eps"] == 1e-8 and group["weight_decay"] == 0.1
    held = {id(p) for p in group["params"]}
    assert not any(id(p) in held for p in model.momentum_encoder.parameters())
    assert id(model.base_encoder.patch_embed.proj.weight) not in held
    assert id(model.predictor[0].weight) in held and id(model.base_encoder.head[0].weight) in held
