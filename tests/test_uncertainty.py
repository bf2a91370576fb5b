"""Where to look next: predictive entropy and the class-stratified slice ranking
(voco_core.inference.uncertainty)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from voco_core.errors import VoCoConfigError
from voco_core.inference import (
    REVIEW_STRATEGIES,
    REVIEW_STRATEGY,
    SliceScore,
    predictive_entropy,
    random_slices,
    rank_slices,
    slice_class_entropy,
    spread_slices,
    suggest_slices,
)


def _softmax(logits: np.ndarray) -> np.ndarray:
    e = np.exp(logits - logits.max(axis=0, keepdims=True))
    return e / e.sum(axis=0, keepdims=True)


def test_predictive_entropy_is_the_softmax_entropy_in_nats():
    rng = np.random.default_rng(0)
    p = _softmax(rng.normal(size=(4, 5, 6, 3)) * 3)
    expected = -(p * np.log(p)).sum(axis=0)
    entropy = predictive_entropy(p)
    assert entropy.shape == (5, 6, 3) and entropy.dtype == np.float32
    np.testing.assert_allclose(entropy, expected, rtol=1e-5, atol=1e-6)
    uniform = np.full((3, 2, 2, 2), 1 / 3, np.float32)
    np.testing.assert_allclose(predictive_entropy(uniform), math.log(3), rtol=1e-6)
    certain = np.zeros((3, 2, 2, 2), np.float32)
    certain[1] = 1.0  # 0 log 0 counts as 0: no NaN
    assert (predictive_entropy(certain) == 0).all()
    with pytest.raises(VoCoConfigError, match="class axis"):
        predictive_entropy(np.ones(3))


def test_slice_class_entropy_is_the_mean_over_each_class_voxels_per_slice():
    rng = np.random.default_rng(1)
    entropy = rng.random((6, 5, 4))
    prediction = rng.integers(0, 3, size=(6, 5, 4))
    prediction[2] = 0  # slice 2 along axis 0: background only
    for axis in range(3):
        table = slice_class_entropy(entropy, prediction, axis, 4)
        assert table.shape == (entropy.shape[axis], 4)
        for s in range(entropy.shape[axis]):
            e, p = np.take(entropy, s, axis=axis), np.take(prediction, s, axis=axis)
            for c in range(4):
                if (p == c).any():
                    assert table[s, c] == pytest.approx(e[p == c].mean())
                else:
                    assert np.isnan(table[s, c])
    assert np.isnan(slice_class_entropy(entropy, prediction, 0, 4)[2, 1:]).all()
    with pytest.raises(VoCoConfigError, match="outside"):
        slice_class_entropy(entropy, prediction, 0, 2)


def _volume():
    """10 slices along axis 0: background everywhere, class 1 on slices 3-6, class 2 on
    slices 7-8. Entropy per (slice, class) chosen so that background's uncertain slices
    would fill an unstratified list."""
    prediction = np.zeros((10, 4, 4), np.uint8)
    entropy = np.zeros((10, 4, 4), np.float32)
    background = [0.9, 0.8, 0.85, 0.1, 0.2, 0.1, 0.1, 0.05, 0.05, 0.7]
    for s, value in enumerate(background):
        entropy[s] = value
    for s, value in zip((3, 4, 5, 6), (0.3, 0.5, 0.4, 0.2), strict=True):
        prediction[s, :2] = 1
        entropy[s, :2] = value
    for s, value in zip((7, 8), (0.25, 0.6), strict=True):
        prediction[s, 2:, 2:] = 2
        entropy[s, 2:, 2:] = value
    return entropy, prediction


def test_rank_slices_round_robin_over_classes_skipping_annotated_slices():
    entropy, prediction = _volume()
    ranked = rank_slices(entropy, prediction, annotated=None, axis=0, num_classes=3)
    assert all(isinstance(row, SliceScore) for row in ranked)
    # round 1: each class's most uncertain slice, best first: background 0 (0.9),
    # class 2 slice 8 (0.6), class 1 slice 4 (0.5)
    assert [(r.index, r.label) for r in ranked[:3]] == [(0, 0), (8, 2), (4, 1)]
    assert ranked[0].score == pytest.approx(0.9) and ranked[2].score == pytest.approx(0.5)
    # round 2: background 2 (0.85), class 1 slice 5 (0.4), class 2 slice 7 (0.25)
    assert [(r.index, r.label) for r in ranked[3:6]] == [(2, 0), (5, 1), (7, 2)]
    assert sorted(r.index for r in ranked) == list(range(10))  # every slice once

    # annotated slices are skipped (mask or indices), the order of the rest kept
    annotated = np.zeros(10, bool)
    annotated[[0, 4, 8]] = True
    skipped = rank_slices(entropy, prediction, annotated, 0, 3)
    assert {r.index for r in skipped} == set(range(10)) - {0, 4, 8}
    assert [(r.index, r.label) for r in skipped[:3]] == [(2, 0), (5, 1), (7, 2)]
    assert rank_slices(entropy, prediction, [0, 4, 8], 0, 3) == skipped
    assert rank_slices(entropy, prediction, [0, 4, 8], 0, 3, limit=2) == skipped[:2]


def test_rank_slices_along_another_axis_is_the_same_ranking_transposed():
    entropy, prediction = _volume()
    moved = rank_slices(np.moveaxis(entropy, 0, 2), np.moveaxis(prediction, 0, 2),
                        [1], axis=2, num_classes=3)
    assert moved == rank_slices(entropy, prediction, [1], axis=0, num_classes=3)


def test_rank_slices_from_a_segmentation_probability_map():
    # what the widget does: entropy of the softmax, argmax as the prediction
    rng = np.random.default_rng(2)
    p = _softmax(rng.normal(size=(3, 8, 6, 5)))
    ranked = rank_slices(predictive_entropy(p), p.argmax(axis=0), [2], 0, 3)
    assert len(ranked) == 7 and 2 not in {r.index for r in ranked}
    assert all(0 <= r.score <= math.log(3) + 1e-6 for r in ranked)
    assert len({r.index for r in ranked}) == 7


def test_spread_slices_is_systematic_spacing_nested():
    foreground = np.zeros(40, bool)
    foreground[10:31] = True  # slices 10..30
    assert spread_slices(foreground, [10, 30], 3) == [20, 15, 25]  # largest gap first
    # the foreground's ends count at half distance: not the edge slices first
    assert spread_slices(foreground, [20], 2) == [13, 27]
    assert spread_slices(foreground, None, 3) == [20, 13, 27]
    assert sorted(spread_slices(foreground, [20])) == [s for s in range(10, 31) if s != 20]
    assert spread_slices(foreground, list(range(10, 31)), 2) == []


def test_random_slices_are_unannotated_foreground_reproducible_per_seed():
    foreground = np.zeros(30, bool)
    foreground[5:15] = True
    picks = random_slices(foreground, [5, 6, 7], 4, rng=3)
    assert len(set(picks)) == 4 and set(picks) <= set(range(8, 15))
    assert picks == random_slices(foreground, [5, 6, 7], 4, rng=3)
    assert picks != random_slices(foreground, [5, 6, 7], 4, rng=4)
    assert sorted(random_slices(foreground, [5, 6, 7], rng=0)) == list(range(8, 15))


def test_suggest_slices_by_each_strategy():
    entropy, prediction = _volume()
    assert REVIEW_STRATEGY in REVIEW_STRATEGIES
    assert suggest_slices(entropy, prediction, [1], 0, 3, strategy="uncertainty") == \
        rank_slices(entropy, prediction, [1], 0, 3)
    foreground = np.any(prediction != 0, axis=(1, 2))
    table = slice_class_entropy(entropy, prediction, 0, 3)
    for strategy in ("random", "even"):
        rows = suggest_slices(entropy, prediction, [1], 0, 3, limit=3, strategy=strategy)
        assert len(rows) == min(3, int(foreground.sum()) - int(foreground[1]))
        for row in rows:
            assert foreground[row.index] and row.index != 1
            assert row.label > 0  # the slice's most uncertain foreground class
            assert row.score == pytest.approx(np.nanmax(table[row.index, 1:]))
    with pytest.raises(VoCoConfigError, match="strategy 'entropy'"):
        suggest_slices(entropy, prediction, strategy="entropy")
    with pytest.raises(VoCoConfigError, match="foreground: expected a bool mask"):
        spread_slices([10, 11, 12], None, 1)
