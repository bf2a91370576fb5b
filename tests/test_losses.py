"""VoCoLoss and VoCoV2Loss against loop-form oracles written from the formulas
(values and gradients)."""

from __future__ import annotations

import math

import pytest
import torch

from voco_core.losses import (
    VoCoLoss,
    VoCoV2Loss,
    build_loss,
    overlap_cross_entropy,
    overlap_logits,
)
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


# ---------------------------------------------------------------- VoCo v2


def v2_loss_loop(s_x, t_x, s_b, t_b, y) -> dict[str, torch.Tensor]:
    """VoCo v2's loss one volume, sub-volume and base crop at a time, straight from
    the formulas: q = relu(cos(s(x), t(b))) against the volume's own bases, CE with
    the -log(1 - q) negative part, inter-volume target relu(cos(t(x_i), t(b^j)))
    (stop-gradient) for relu(cos(s(x_i), s(b^j))), j = (i + 1) mod B."""

    def relu_cos(a, b):
        return torch.relu(torch.nn.functional.cosine_similarity(a, b, dim=0))

    def cross_entropy(target, pred):  # lists of lists (m x K) of scalars
        num, den, neg, count = 0.0, 0.0, 0.0, 0
        for target_row, pred_row in zip(target, pred, strict=True):
            for t, p in zip(target_row, pred_row, strict=True):
                num = num + t * torch.log(1 - torch.abs(t - p) + 1e-6)
                den = den + t
                if t == 0:
                    neg = neg - torch.log(1 - p + 1e-6)
                    count += 1
        return -num / (den + 1e-6) + neg / (count + 1e-6)

    batch, m, k = y.shape
    intra_terms, inter_terms, reg_terms = [], [], []
    for i in range(batch):
        j = (i + 1) % batch
        q = [[relu_cos(s_x[i, a], t_b[i, c]) for c in range(k)] for a in range(m)]
        labels = [[y[i, a, c] for c in range(k)] for a in range(m)]
        intra_terms.append(cross_entropy(labels, q))
        r = [[relu_cos(t_x[i, a], t_b[j, c]).detach() for c in range(k)] for a in range(m)]
        u = [[relu_cos(s_x[i, a], s_b[j, c]) for c in range(k)] for a in range(m)]
        inter_terms.append(cross_entropy(r, u))
        pairs = [relu_cos(s_b[i, c], s_b[i, l].detach()) ** 2
                 for c in range(k) for l in range(c + 1, k)]
        reg_terms.append(sum(pairs) / len(pairs))
    intra, inter, reg = (sum(t) / batch for t in (intra_terms, inter_terms, reg_terms))
    return {"total": intra + inter + reg, "intra": intra, "inter": inter, "reg": reg}


def correlated_inputs(batch, m=3, k=9, d=16, seed=0):
    """Like make_inputs, with teacher features near the student's (as an EMA teacher
    gives) so that some cosines are positive and some cut by relu."""
    (s_x, t_x, s_b, t_b), y = make_inputs(batch=batch, m=m, k=k, d=d, seed=seed)
    g = torch.Generator().manual_seed(seed + 100)
    with torch.no_grad():
        t_x.copy_(s_x + 0.3 * torch.randn(s_x.shape, generator=g, dtype=s_x.dtype))
        t_b.copy_(s_b + 0.3 * torch.randn(s_b.shape, generator=g, dtype=s_b.dtype))
    return (s_x, t_x, s_b, t_b), y


@pytest.mark.parametrize("batch", [1, 2, 3])
def test_v2_values_and_gradients_equal_the_loop_oracle(batch):
    (s_x, t_x, s_b, t_b), y = correlated_inputs(batch)
    target = overlap_logits(t_x, t_b.roll(-1, dims=0))
    assert (target == 0).any() and (target > 0).any()  # both parts of the inter CE are used
    fast = VoCoV2Loss()(s_x, t_x, s_b, t_b, y)
    slow = v2_loss_loop(s_x, t_x, s_b, t_b, y)
    for key in ("total", "intra", "inter", "reg"):
        assert float(fast[key]) == pytest.approx(float(slow[key]), abs=1e-5), key
    assert fast["logits"].shape == (batch, 3, 9)
    assert float(fast["inter"]) > 0 and float(fast["intra"]) > 0

    inputs = [s_x, t_x, s_b, t_b]
    grads_fast = torch.autograd.grad(fast["total"], inputs, allow_unused=True)
    grads_slow = torch.autograd.grad(slow["total"], inputs, allow_unused=True)
    for name, gf, gs in zip(("s_x", "t_x", "s_b", "t_b"), grads_fast, grads_slow, strict=True):
        if gs is None:
            assert gf is None or gf.abs().sum() == 0, name
        else:
            torch.testing.assert_close(gf, gs, atol=1e-5, rtol=1e-5, msg=name)
    # The teacher's crops only give the inter-volume target: no gradient reaches them.
    assert grads_fast[1] is None or grads_fast[1].abs().sum() == 0


def test_v2_logits_are_the_one_direction_student_vs_teacher_overlap():
    (s_x, t_x, s_b, t_b), y = correlated_inputs(2)
    out = VoCoV2Loss()(s_x, t_x, s_b, t_b, y)
    torch.testing.assert_close(out["logits"], overlap_logits(s_x, t_b))
    assert set(out) == {"total", "intra", "inter", "reg", "logits"}


def test_v2_inter_term_looks_at_the_neighbour_volume():
    (s_x, t_x, s_b, t_b), y = correlated_inputs(3)
    base = VoCoV2Loss()(s_x, t_x, s_b, t_b, y)
    with torch.no_grad():  # change volume 0's bases: volume 2's inter term (j = 0) moves
        s_b2, t_b2 = s_b.detach().clone(), t_b.detach().clone()
        s_b2[0] = torch.randn_like(s_b2[0])
        t_b2[0] = s_b2[0]
    alone = VoCoV2Loss()(s_x, t_x, s_b2, t_b2, y)
    assert float(alone["inter"]) != pytest.approx(float(base["inter"]), abs=1e-6)
    # Identical volumes: the inter term is the student-vs-student intra term with a
    # teacher-given target, and with t == s that target is the prediction itself.
    same = VoCoV2Loss()(s_x[:1], s_x[:1], s_b[:1], s_b[:1], y[:1])
    u = overlap_logits(s_x[:1], s_b[:1])
    assert float(same["inter"]) == pytest.approx(float(overlap_cross_entropy(u, u)), abs=1e-9)


def test_v2_weights_and_teacher_requirement():
    (s_x, t_x, s_b, t_b), y = correlated_inputs(2, seed=4)
    plain = VoCoV2Loss()(s_x, t_x, s_b, t_b, y)
    weighted = VoCoV2Loss(0.5, 2.0, 0.0)(s_x, t_x, s_b, t_b, y)
    expected = 0.5 * plain["intra"] + 2.0 * plain["inter"]
    assert weighted["total"].item() == pytest.approx(expected.item(), rel=1e-9)
    with pytest.raises(ValueError, match="teacher"):
        VoCoV2Loss()(s_x, None, s_b, None, y)


def test_v2_runs_in_float32_under_autocast():
    (s_x, t_x, s_b, t_b), y = correlated_inputs(2)
    low = [t.detach().to(torch.bfloat16) for t in (s_x, t_x, s_b, t_b)]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = VoCoV2Loss()(*low, y.float())
    assert out["total"].dtype == torch.float32 and out["logits"].dtype == torch.float32
    reference = VoCoV2Loss()(*(t.float() for t in low), y.float())
    assert out["total"].item() == pytest.approx(reference["total"].item(), abs=1e-6)


def test_build_loss_follows_the_config():
    from voco_core.config import make_pretrain_config

    v1 = build_loss(make_pretrain_config("tiny", {"loss": {"pos_weight": 2.0}}, check_device=False))
    assert isinstance(v1, VoCoLoss) and v1.weights == {"pos": 2.0, "neg": 1.0, "reg": 1.0}
    v2 = build_loss(make_pretrain_config("tiny", {"loss": {"variant": "v2", "inter_weight": 0.5},
                                         "model": {"teacher": "head"}}, check_device=False))
    assert isinstance(v2, VoCoV2Loss)
    assert v2.weights == {"intra": 1.0, "inter": 0.5, "reg": 1.0}
