"""VoCoLoss against the loop-form oracle written from the spec's formulas (values and gradients)."""

from __future__ import annotations

import math

import pytest
import torch

from voco_core.losses import VoCoLoss
from voco_core.reference import voco_loss_loop


def make_inputs(batch=2, m=2, k=16, d=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    tensors = [torch.randn(batch, n, d, generator=g, dtype=torch.float64) for n in (m, m, k, k)]
    # Realistic labels: overlaps of a crop with at most 4 cells, summing to 1.
    y = torch.zeros(batch, m, k, dtype=torch.float64)
    for b in range(batch):
        for i in range(m):
            cells = torch.randperm(k, generator=g)[: min(4, k)]
            weights = torch.rand(len(cells), generator=g, dtype=torch.float64)
            y[b, i, cells] = weights / weights.sum()
    return [t.requires_grad_() for t in tensors], y


@pytest.mark.parametrize("teacher", [True, False])
def test_values_and_gradients_equal_the_loop_oracle(teacher):
    (s_x, t_x, s_b, t_b), y = make_inputs()
    loss = VoCoLoss()
    fast = loss(s_x, t_x if teacher else None, s_b, t_b if teacher else None, y)
    slow = voco_loss_loop(s_x, t_x, s_b, t_b, y, teacher)
    for key in ("total", "pos", "neg", "reg"):
        assert float(fast[key]) == pytest.approx(float(slow[key]), abs=1e-5), key
    assert fast["logits"].shape == (2, 2, 16)

    inputs = [s_x, t_x, s_b, t_b] if teacher else [s_x, s_b]
    grads_fast = torch.autograd.grad(fast["total"], inputs, allow_unused=True)
    grads_slow = torch.autograd.grad(slow["total"], inputs, allow_unused=True)
    for gf, gs in zip(grads_fast, grads_slow, strict=True):
        torch.testing.assert_close(gf, gs, atol=1e-5, rtol=1e-5)


def test_regulariser_gradient_flows_through_one_side_only():
    (s_x, _, s_b, _), y = make_inputs(batch=1, m=1, k=2)
    reg = VoCoLoss()(s_x, None, s_b, None, y)["reg"]
    (grad,) = torch.autograd.grad(reg, [s_b])
    # Pair (0, 1): only b_0 receives gradient (b_1 is the stop-gradient side).
    assert grad[0, 1].abs().sum() == 0
    assert grad[0, 0].abs().sum() > 0 or reg.item() == 0


def test_perfect_prediction_has_zero_position_loss():
    d = 8
    bases = torch.eye(d)[None, :4]  # orthogonal base features: no regulariser
    crops = bases[:, [2]].clone()  # a sub-volume that is exactly base crop 2
    y = torch.zeros(1, 1, 4)
    y[0, 0, 2] = 1.0
    out = VoCoLoss()(crops, crops, bases, bases, y)
    assert out["pos"].item() == pytest.approx(-math.log(1 + 1e-6), abs=1e-6)
    assert out["neg"].item() == 0 and out["reg"].item() == 0
    torch.testing.assert_close(out["logits"], y)


def test_weights_scale_the_terms():
    (s_x, t_x, s_b, t_b), y = make_inputs(seed=3)
    plain = VoCoLoss()(s_x, t_x, s_b, t_b, y)
    weighted = VoCoLoss(2.0, 0.5, 0.0)(s_x, t_x, s_b, t_b, y)
    expected = 2 * plain["pos"] + 0.5 * plain["neg"]
    assert weighted["total"].item() == pytest.approx(expected.item(), rel=1e-9)
