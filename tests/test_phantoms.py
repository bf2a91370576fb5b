"""Synthetic phantoms: determinism, organ layout across subjects, dataset layout."""

from __future__ import annotations

import json

import numpy as np
import pytest

from voco_core.data.datalists import load_datalist
from voco_core.data.io import check_pair, read_volume
from voco_core.data.phantoms import LABEL_NAMES, LABELS, make_phantom, make_phantom_dataset

from conftest import SMALL_SHAPE

SHAPE = (64, 64, 48)


def test_same_seed_gives_identical_arrays_and_identical_file_bytes(tmp_path):
    a, b = make_phantom(3, 1, SHAPE), make_phantom(3, 1, SHAPE)
    np.testing.assert_array_equal(a.image, b.image)
    np.testing.assert_array_equal(a.label, b.label)
    assert not np.array_equal(a.image, make_phantom(4, 1, SHAPE).image)
    assert not np.array_equal(a.image, make_phantom(3, 2, SHAPE).image)

    first = make_phantom_dataset(tmp_path / "first", n=2, seed=7, shape=SMALL_SHAPE).parent
    second = make_phantom_dataset(tmp_path / "second", n=2, seed=7, shape=SMALL_SHAPE).parent
    files = sorted(p.relative_to(first) for p in first.rglob("*") if p.is_file())
    assert len(files) == 5
    for relative in files:
        assert (first / relative).read_bytes() == (second / relative).read_bytes(), relative


def _world_centroids(phantom):
    """Centroid (x, y, z) in mm of each label, RAS+: +x patient right, +y anterior, +z up."""
    index = np.indices(phantom.label.shape).reshape(3, -1)
    world = phantom.affine[:3, :3] @ index + phantom.affine[:3, 3:4]
    flat = phantom.label.reshape(-1)
    return {name: world[:, flat == value].mean(axis=1) for name, value in LABELS.items()
            if value and (flat == value).any()}


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_every_organ_present_in_its_body_region(seed):
    phantom = make_phantom(seed, seed + 5, SHAPE)
    assert phantom.image.dtype == np.int16 and phantom.label.dtype == np.uint8
    counts = np.bincount(phantom.label.reshape(-1), minlength=len(LABEL_NAMES))
    present = dict(zip(LABEL_NAMES.values(), counts, strict=True))
    assert (counts > 20).all(), f"missing organ: {present}"
    c = _world_centroids(phantom)
    x, y, z = 0, 1, 2
    assert c["liver"][x] > 30 and c["spleen"][x] < -30  # liver right, spleen left
    assert c["kidney_right"][x] > 20 and c["kidney_left"][x] < -20
    assert abs(c["spine"][x]) < 20 and abs(c["aorta"][x]) < 30  # midline
    assert c["spine"][y] < c["aorta"][y] < c["liver"][y]  # spine posterior, aorta in front
    assert c["kidney_right"][y] < 0 and c["kidney_left"][y] < 0  # posterior
    assert c["stomach"][y] > c["spleen"][y] and c["stomach"][x] < 0  # anterior-left
    assert c["lungs"][z] > c["liver"][z] > c["kidney_right"][z]  # cranio-caudal order
    assert c["lungs"][z] > 30


def test_organ_intensities_are_ct_like_and_overlap():
    phantom = make_phantom(0, 0, SHAPE)
    hu = {name: np.median(phantom.image[phantom.label == value])
          for name, value in LABELS.items()}
    assert hu["background"] < -900 and hu["lungs"] < -600
    assert hu["spine"] > 200 and hu["ribs"] > 200
    assert 60 < hu["liver"] < 140 and 60 < hu["spleen"] < 160
    # Non-trivial: liver and spleen intensities overlap heavily (noise + texture).
    liver = phantom.image[phantom.label == LABELS["liver"]]
    spleen = phantom.image[phantom.label == LABELS["spleen"]]
    assert np.percentile(liver, 90) > np.percentile(spleen, 10)


def test_anisotropic_spacing_option():
    phantom = make_phantom(0, 0, (48, 48, 24), spacing=(3.0, 3.0, 6.0))
    assert phantom.spacing == (3.0, 3.0, 6.0)
    np.testing.assert_allclose(np.diag(phantom.affine)[:3], [3.0, 3.0, 6.0])
    np.testing.assert_allclose(phantom.affine[:3, 3], [-70.5, -70.5, -69.0])


def test_dataset_layout_loads_back(phantom_dataset):
    spec = json.loads((phantom_dataset / "dataset.json").read_text())
    assert spec["numTraining"] == 3 and spec["labels"]["5"] == "liver"
    entries = load_datalist(phantom_dataset / "dataset.json", require_labels=True)
    image, label = read_volume(entries[0].image), read_volume(entries[0].label)
    check_pair(image, label)
    assert image.shape == SMALL_SHAPE and image.orientation == "RAS"
    assert label.has_integer_dtype and set(np.unique(label.array)) <= set(LABEL_NAMES)


def test_bad_arguments():
    with pytest.raises(ValueError, match="shape"):
        make_phantom(0, 0, (8, 64, 64))
    with pytest.raises(ValueError, match="spacing"):
        make_phantom(0, 0, SHAPE, spacing=(1.0, 0.0, 1.0))


def test_unwritable_dataset_json_is_one_line_and_leaves_no_temporary_file(tmp_path):
    from voco_core.errors import VoCoDataError

    (tmp_path / "dataset.json").mkdir()  # something in the way
    with pytest.raises(VoCoDataError, match=r"dataset\.json: exists; .*--overwrite"):
        make_phantom_dataset(tmp_path, n=1, shape=(32, 32, 32))  # refused before writing
    with pytest.raises(VoCoDataError, match=r"dataset\.json: cannot write"):
        make_phantom_dataset(tmp_path, n=1, shape=(32, 32, 32), overwrite=True)
    assert not list(tmp_path.glob("*.tmp"))
