"""Geometry: base-crop grid, random centres, overlap labels against the spec's loop formula."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from voco_core.geometry import (
    base_crop_grid,
    crop_boxes_from_centres,
    overlap_labels,
    sample_crop_centres,
)


def spec_labels(centre, crop, base_boxes):
    """The spec's formula, one base crop at a time (the oracle)."""
    x0, x1 = centre[0] - crop[0] // 2, centre[0] - crop[0] // 2 + crop[0]
    y0, y1 = centre[1] - crop[1] // 2, centre[1] - crop[1] // 2 + crop[1]
    out = []
    for (bx0, bx1), (by0, by1), _ in base_boxes:
        area = max(0, min(x1, bx1) - max(x0, bx0)) * max(0, min(y1, by1) - max(y0, by0))
        out.append(area / (crop[0] * crop[1]))
    return np.array(out, dtype=np.float32)


def test_authors_grid_is_sixteen_96_cubes_i_major():
    boxes = base_crop_grid((384, 384, 96), 4)
    assert boxes.shape == (16, 3, 2)
    assert boxes[0].tolist() == [[0, 96], [0, 96], [0, 96]]
    assert boxes[1].tolist() == [[0, 96], [96, 192], [0, 96]]  # k = i * n + j: j runs fastest
    assert boxes[4].tolist() == [[96, 192], [0, 96], [0, 96]]
    assert boxes[15].tolist() == [[288, 384], [288, 384], [0, 96]]
    covered = np.zeros((384, 384), int)
    for (x0, x1), (y0, y1), _ in boxes:
        covered[x0:x1, y0:y1] += 1
    assert (covered == 1).all()  # a partition of the x-y plane


def test_grid_must_divide():
    with pytest.raises(ValueError, match="divide"):
        base_crop_grid((100, 96, 32), 3)


def test_centres_follow_the_spec_bounds():
    rng = np.random.default_rng(0)
    centres = sample_crop_centres(rng, (384, 384, 96), (96, 96, 96), 20000)
    assert centres.min() == 48 and centres.max() == 335  # 48 <= c < 384 - 48
    whole = sample_crop_centres(rng, (96, 96, 32), (96, 96, 32), 5)
    assert (whole == 48).all()  # a crop as large as the volume has one place


@settings(max_examples=60, deadline=None)
@given(
    n=st.integers(1, 5),
    cell=st.integers(4, 20),
    crop_fraction=st.floats(0.3, 1.0),
    seed=st.integers(0, 2**31),
)
def test_labels_equal_the_spec_formula_and_sum_to_one(n, cell, crop_fraction, seed):
    volume = (n * cell, n * cell, 8)
    crop = (max(1, int(cell * crop_fraction)), max(1, int(cell * crop_fraction)), 8)
    base = base_crop_grid(volume, n)
    rng = np.random.default_rng(seed)
    centres = sample_crop_centres(rng, volume, crop, 3)
    boxes = crop_boxes_from_centres(centres, crop, volume)
    assert (boxes[:, :2, 0] >= 0).all() and (boxes[:, 0, 1] <= volume[0]).all()
    assert (boxes[:, 1, 1] <= volume[1]).all()
    labels = overlap_labels(boxes, base)
    assert labels.shape == (3, n * n)
    for i in range(3):
        np.testing.assert_array_equal(labels[i], spec_labels(centres[i], crop, base))
    np.testing.assert_allclose(labels.sum(axis=1), 1.0, rtol=1e-6)
    assert ((labels > 0).sum(axis=1) <= 4).all()  # no larger than a cell: at most 4 cells


def test_labels_are_vectorised_over_a_batch():
    base = base_crop_grid((120, 120, 40), 3)
    rng = np.random.default_rng(1)
    boxes = np.stack([crop_boxes_from_centres(sample_crop_centres(rng, (120, 120, 40),
                                                                  (40, 40, 40), 2),
                                              (40, 40, 40), (120, 120, 40)) for _ in range(4)])
    batched = overlap_labels(boxes, base)
    assert batched.shape == (4, 2, 9)
    for b in range(4):
        np.testing.assert_array_equal(batched[b], overlap_labels(boxes[b], base))


def test_crop_aligned_with_a_cell_has_a_one_hot_label():
    base = base_crop_grid((384, 384, 96), 4)
    boxes = crop_boxes_from_centres(np.array([[96 + 48, 48]]), (96, 96, 96), (384, 384, 96))
    np.testing.assert_array_equal(overlap_labels(boxes, base)[0], np.eye(16)[4])
