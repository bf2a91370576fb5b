"""Phantom styles: ``classic`` unchanged, ``varied`` varies the way CT populations do.

The varied population's ranges are the fixed specification of docs/data.md ("Varied
phantoms"); these tests check that the rendered subjects show that variety (field of
view, organ volumes, contrast phase, noise, voxel size, absent organs, lesions), that
every subject is still a valid, labelled, Decathlon-layout volume, and determinism.
"""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest
import scipy
from scipy import ndimage

from voco_core.data.datalists import load_datalist
from voco_core.data.io import check_pair, read_volume
from voco_core.data.phantoms import LABEL_NAMES, LABELS, make_phantom, make_phantom_dataset

from conftest import one_line_error

SHAPE = (64, 64, 48)
POPULATION = 32  # subjects of seed 0 rendered once for the population tests

# sha256 of image + label + affine bytes of classic subjects, recorded from the
# generator as it was before styles existed (x86-64, numpy 2.4.6, scipy 1.17.1). A
# classic subject must never change: recorded benchmark results rely on it.
CLASSIC_HASHES = {
    (0, 0, (64, 64, 48), None):
        "2583252320c9ac6b3359fdfce0d2b3b2505ba0e05d897c2f352943d5060455c5",
    (3, 1, (64, 64, 48), None):
        "b7ec24ad67779cf5c6d06abcfb6c742fc5c5c6a80a888d29c8908121a8c0d0f1",
    (7, 5, (48, 48, 32), None):
        "9435156b6016135bef70647fcbae1232dd81f967db43863906ccc3105b91bdba",
    (0, 0, (48, 48, 24), (3.0, 3.0, 6.0)):
        "904a025170487cefb3f5e057318cc5b74df3f85da31027d2d45975bd2a7c044f",
}
# sha256 of dataset.json of make_phantom_dataset(n=2, seed=7, shape=(48, 48, 32)), same origin.
CLASSIC_DATASET_JSON = "650ca7b8f3b95e6188d45761bc819e23985769db78cc19e42a50b4434c2d2465"
_RECORDED_WITH = ("2.4", "1.17")


def _digest(phantom) -> str:
    return hashlib.sha256(phantom.image.tobytes() + phantom.label.tobytes()
                          + phantom.affine.tobytes()).hexdigest()


@pytest.mark.parametrize(("seed", "index", "shape", "spacing"), list(CLASSIC_HASHES))
def test_classic_is_byte_identical_to_before_styles(seed, index, shape, spacing):
    default = make_phantom(seed, index, shape, spacing)
    explicit = make_phantom(seed, index, shape, spacing, style="classic")
    np.testing.assert_array_equal(default.image, explicit.image)
    np.testing.assert_array_equal(default.label, explicit.label)
    assert default.info == {} and explicit.info == {}
    versions = tuple(".".join(v.split(".")[:2]) for v in (np.__version__, scipy.__version__))
    if versions != _RECORDED_WITH:
        pytest.skip(f"hashes recorded with numpy/scipy {_RECORDED_WITH}, running {versions}")
    assert _digest(default) == CLASSIC_HASHES[(seed, index, shape, spacing)]


def test_classic_dataset_json_is_unchanged(tmp_path):
    dataset_json = make_phantom_dataset(tmp_path, n=2, seed=7, shape=(48, 48, 32))
    assert hashlib.sha256(dataset_json.read_bytes()).hexdigest() == CLASSIC_DATASET_JSON
    assert "style" not in json.loads(dataset_json.read_text())["phantom"]


def test_varied_is_deterministic_per_seed_and_index(tmp_path):
    a = make_phantom(5, 3, SHAPE, style="varied")
    b = make_phantom(5, 3, SHAPE, style="varied")
    np.testing.assert_array_equal(a.image, b.image)
    np.testing.assert_array_equal(a.label, b.label)
    np.testing.assert_array_equal(a.affine, b.affine)
    assert a.info == b.info and a.spacing == b.spacing
    assert not np.array_equal(a.image, make_phantom(5, 4, SHAPE, style="varied").image)
    assert not np.array_equal(a.image, make_phantom(6, 3, SHAPE, style="varied").image)
    # A classic subject of the same seed and index is another subject.
    assert a.spacing != make_phantom(5, 3, SHAPE).spacing

    first = make_phantom_dataset(tmp_path / "1", n=2, seed=2, shape=(48, 48, 32), style="varied")
    second = make_phantom_dataset(tmp_path / "2", n=2, seed=2, shape=(48, 48, 32), style="varied")
    files = sorted(p.relative_to(first.parent) for p in first.parent.rglob("*") if p.is_file())
    assert len(files) == 5
    for relative in files:
        assert (first.parent / relative).read_bytes() == (second.parent / relative).read_bytes()


@pytest.fixture(scope="module")
def population():
    return [make_phantom(0, index, SHAPE, style="varied") for index in range(POPULATION)]


def _counts(phantom) -> np.ndarray:
    return np.bincount(phantom.label.reshape(-1), minlength=len(LABEL_NAMES))


def test_every_varied_subject_is_a_valid_labelled_volume(population):
    for phantom in population:
        assert phantom.image.shape == SHAPE and phantom.label.shape == SHAPE
        assert phantom.image.dtype == np.int16 and phantom.label.dtype == np.uint8
        assert phantom.label.max() <= max(LABEL_NAMES)
        np.testing.assert_allclose(np.diag(phantom.affine)[:3], phantom.spacing)
        centre = [-(n - 1) / 2 * s for n, s in zip(SHAPE, phantom.spacing, strict=True)]
        np.testing.assert_allclose(phantom.affine[:3, 3], centre)  # centred, like classic
        counts = _counts(phantom)
        for name in ("body", "spine", "aorta", "liver"):  # in every scan range
            assert counts[LABELS[name]] > 0, (name, phantom.info)
        json.dumps(phantom.info)  # JSON-ready for dataset.json


def test_field_of_view_differs_chest_abdomen_both(population):
    lungs = np.array([_counts(p)[LABELS["lungs"]] for p in population])
    kidneys = np.array([_counts(p)[[LABELS["kidney_right"], LABELS["kidney_left"]]].sum()
                        for p in population])
    regions = [p.info["region"] for p in population]
    assert set(regions) == {"chest", "abdomen", "chest+abdomen"}
    abdomen_only = (lungs == 0) & (kidneys > 0)
    chest_only = (kidneys == 0) & (lungs > 0)
    assert abdomen_only.any() and chest_only.any() and ((lungs > 0) & (kidneys > 0)).any()
    assert all(regions[i] == "abdomen" for i in np.flatnonzero(lungs == 0))
    assert all(regions[i] == "chest" for i in np.flatnonzero(kidneys == 0))
    # Scan length, display field of view, patient size and position all vary.
    length = [p.spacing[2] * SHAPE[2] for p in population]
    assert max(length) > 2.5 * min(length)
    assert max(p.spacing[0] for p in population) > 1.3 * min(p.spacing[0] for p in population)
    width = [p.info["body_width_mm"] for p in population]
    assert max(width) > 1.3 * min(width)
    offsets = np.array([p.info["offset_mm"] for p in population])
    assert np.abs(offsets).max() > 15 and offsets.std(axis=0).min() > 5


def test_organ_volumes_differ(population):
    # Subjects scanned chest to abdomen hold their whole liver, spleen and kidneys.
    whole = [p for p in population if p.info["region"] == "chest+abdomen"]
    assert len(whole) >= 5
    ml = {name: [_counts(p)[LABELS[name]] * np.prod(p.spacing) / 1000 for p in whole
                 if name not in p.info["absent"]] for name in ("liver", "spleen", "kidney_left")}
    assert max(ml["liver"]) > 1.5 * min(ml["liver"])
    assert 800 < np.median(ml["liver"]) < 2200  # adult livers: about 1.0-2.5 L
    assert max(ml["spleen"]) > 1.6 * min(ml["spleen"])
    assert max(ml["kidney_left"]) > 1.3 * min(ml["kidney_left"])


def test_contrast_phase_shifts_organ_intensities(population):
    by_phase: dict[str, list[float]] = {}
    for p in population:
        aorta = p.image[p.label == LABELS["aorta"]].astype(float)
        by_phase.setdefault(p.info["phase"], []).append(float(np.median(aorta)))
    assert set(by_phase) == {"non-contrast", "arterial", "portal-venous"}
    plain, arterial, venous = (np.mean(by_phase[k])
                               for k in ("non-contrast", "arterial", "portal-venous"))
    assert plain < 80 < 110 < venous < 230 < arterial, by_phase
    assert max(by_phase["non-contrast"]) < min(by_phase["portal-venous"])
    assert max(by_phase["portal-venous"]) < min(by_phase["arterial"])


def test_noise_and_slice_thickness_differ(population):
    reported, measured = [], []
    for p in population:
        # Air far from the body: its upper half (above -1000 HU, never clipped) is noise.
        air = (p.label == 0) & ~ndimage.binary_dilation(p.label > 0, iterations=3)
        values = p.image[air].astype(float)
        measured.append(np.percentile(values, 84) - np.percentile(values, 50))
        reported.append(p.info["noise_sd_hu"])
    np.testing.assert_allclose(measured, reported, atol=1.5)
    assert max(reported) > 2.5 * min(reported)
    thickness = {p.info["slice_thickness_mm"] for p in population}
    assert min(thickness) <= 1.25 and max(thickness) == 5.0 and len(thickness) >= 4
    z_spacing = [p.spacing[2] for p in population]
    assert max(z_spacing) > 2.5 * min(z_spacing)


def test_some_subject_lacks_an_organ_and_some_has_a_liver_lesion(population):
    absent = [p for p in population if p.info["absent"]]
    assert absent
    for p in absent:
        for name in p.info["absent"]:
            assert _counts(p)[LABELS[name]] == 0
    # A solitary kidney in a scan that covers the kidneys: one kidney label only.
    solitary = [p for p in population if {"kidney_left", "kidney_right"} & set(p.info["absent"])
                and p.info["region"] != "chest"]
    spleen_gone = [p for p in population if "spleen" in p.info["absent"]]
    assert solitary or spleen_gone

    with_lesion = [p for p in population if any(les["voxels"] for les in p.info["lesions"])]
    assert with_lesion
    for p in with_lesion:
        assert all(les["kind"] in ("cyst", "hypovascular", "hypervascular")
                   for les in p.info["lesions"])
    # Lesions are labelled liver: the label set stays the same 11 classes.
    assert all(set(np.unique(p.label)) <= set(LABEL_NAMES) for p in population)


def test_varied_dataset_is_decathlon_with_per_subject_geometry(tmp_path):
    dataset_json = make_phantom_dataset(tmp_path, n=3, seed=1, shape=(48, 48, 32),
                                        style="varied")
    spec = json.loads(dataset_json.read_text())
    assert spec["numTraining"] == 3 and spec["labels"]["5"] == "liver"
    assert spec["phantom"]["style"] == "varied" and len(spec["phantom"]["subjects"]) == 3
    entries = load_datalist(dataset_json, require_labels=True)
    for entry, subject in zip(entries, spec["phantom"]["subjects"], strict=True):
        image, label = read_volume(entry.image), read_volume(entry.label)
        check_pair(image, label)
        assert image.shape == (48, 48, 32) and image.orientation == "RAS"
        np.testing.assert_allclose(image.spacing, subject["spacing_mm"], atol=1e-3)
        assert subject["region"] in ("chest", "abdomen", "chest+abdomen")
        assert label.has_integer_dtype and set(np.unique(label.array)) <= set(LABEL_NAMES)


def test_bad_style_and_spacing_with_varied_are_refused(tmp_path, capsys):
    from voco_core.cli import main

    with pytest.raises(ValueError, match="style must be one of classic, varied"):
        make_phantom(0, 0, SHAPE, style="mixed")
    with pytest.raises(ValueError, match="spacing"):
        make_phantom(0, 0, SHAPE, spacing=(2.0, 2.0, 2.0), style="varied")
    with pytest.raises(ValueError, match="style"):
        make_phantom_dataset(tmp_path, n=1, style="mixed")

    with pytest.raises(SystemExit) as exit_info:
        main(["make-phantoms", "--out", str(tmp_path / "a"), "--style", "mixed"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "error: argument --style: invalid choice: 'mixed'" in err and "Traceback" not in err

    assert main(["make-phantoms", "--out", str(tmp_path / "b"), "--style", "varied",
                 "--spacing", "2", "2", "2"]) == 1
    one_line_error(capsys, "--spacing", "--style varied")
    assert not (tmp_path / "b").exists()


def test_cli_writes_a_varied_population_and_documents_the_style(tmp_path, capsys):
    from voco_core.cli import build_parser, main

    assert main(["make-phantoms", "--out", str(tmp_path), "-n", "2", "--shape", "48", "48",
                 "32", "--style", "varied"]) == 0
    assert "wrote 2 varied phantoms" in capsys.readouterr().out
    assert json.loads((tmp_path / "dataset.json").read_text())["phantom"]["style"] == "varied"

    with pytest.raises(SystemExit):
        build_parser().parse_args(["make-phantoms", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "--style {classic,varied}" in text
    assert "classic (default)" in text and "contrast phase" in text
