"""NIfTI I/O round trips, datalists, and every bad input giving a typed error."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import numpy as np
import pytest

from voco_core.data.io import (
    DatalistEntry,
    check_min_shape,
    check_pair,
    load_datalist,
    read_volume,
    write_volume,
)
from voco_core.errors import VoCoDataError

from conftest import save_nifti


@pytest.mark.parametrize("suffix", [".nii", ".nii.gz"])
@pytest.mark.parametrize("dtype", [np.float32, np.int16, np.uint8, np.float64])
def test_round_trip_keeps_affine_spacing_shape_dtype(tmp_path, rotated_affine, suffix, dtype):
    rng = np.random.default_rng(0)
    data = (rng.uniform(-100, 100, size=(9, 7, 5))).astype(dtype)
    source = read_volume(save_nifti(tmp_path / f"src{suffix}", data, rotated_affine))
    assert source.spacing == pytest.approx((0.8, 0.8, 2.5))
    assert source.orientation == "LPS"

    result = source.array[::-1].copy()  # any result on the same grid
    out = write_volume(tmp_path / f"out{suffix}", result, like=source)
    back = read_volume(out)
    assert back.shape == source.shape == (9, 7, 5)
    assert back.array.dtype == np.dtype(dtype)
    np.testing.assert_array_equal(back.array, result)
    np.testing.assert_allclose(back.affine, rotated_affine, atol=1e-5)
    assert back.spacing == pytest.approx(source.spacing)
    assert not list(tmp_path.glob(".*tmp*")), "temporary file left behind"


def test_label_map_written_with_source_geometry_and_bool_becomes_uint8(tmp_path, rotated_affine):
    image = read_volume(save_nifti(tmp_path / "img.nii.gz",
                                   np.zeros((6, 6, 4), np.float32), rotated_affine))
    mask = np.zeros((6, 6, 4), bool)
    mask[2:4, 1:5, 1:3] = True
    label = read_volume(write_volume(tmp_path / "lab.nii.gz", mask, like=image))
    assert label.is_label_map and label.array.dtype == np.uint8
    assert label.array.sum() == mask.sum()
    check_pair(image, label)


def test_four_d_single_channel_is_accepted_as_three_d(tmp_path):
    record = read_volume(save_nifti(tmp_path / "c1.nii", np.ones((5, 6, 7, 1), np.float32)))
    assert record.shape == (5, 6, 7)


def test_describe_reports_what_voco_info_prints(tmp_path):
    data = np.arange(4 * 5 * 6, dtype=np.int16).reshape(4, 5, 6) - 100
    summary = read_volume(save_nifti(tmp_path / "a.nii.gz", data)).describe()
    assert summary["shape"] == [4, 5, 6]
    assert summary["orientation"] == "RAS"
    assert summary["intensity_min"] == -100 and summary["intensity_max"] == 19


# ---------------------------------------------------------------- bad inputs


def _expect_error(path_in_message: Path, fragment: str):
    return pytest.raises(VoCoDataError, match=fr"{path_in_message.name}.*{fragment}")


def test_missing_file(tmp_path):
    with _expect_error(tmp_path / "absent.nii.gz", "not found"):
        read_volume(tmp_path / "absent.nii.gz")


def test_not_a_nifti_by_name_and_by_content(tmp_path):
    text = tmp_path / "notes.txt"
    text.write_text("hello")
    with _expect_error(text, "not a NIfTI"):
        read_volume(text)
    fake = tmp_path / "fake.nii"
    fake.write_bytes(b"this is not a nifti header" * 40)
    with _expect_error(fake, "cannot be read as NIfTI"):
        read_volume(fake)


def test_folder_instead_of_file(tmp_path):
    with _expect_error(tmp_path, "is a folder"):
        read_volume(tmp_path)


def test_truncated_gzip(tmp_path):
    good = save_nifti(tmp_path / "good.nii.gz", np.random.default_rng(0)
                      .normal(size=(32, 32, 32)).astype(np.float32))
    truncated = tmp_path / "truncated.nii.gz"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(VoCoDataError, match=r"truncated\.nii\.gz.*(truncated|corrupt|read)"):
        read_volume(truncated)


def test_corrupt_gzip(tmp_path):
    good = save_nifti(tmp_path / "good.nii.gz", np.ones((16, 16, 16), np.float32))
    raw = bytearray(good.read_bytes())
    raw[20:60] = b"\xff" * 40  # inside the deflate stream
    corrupt = tmp_path / "corrupt.nii.gz"
    corrupt.write_bytes(bytes(raw))
    with pytest.raises(VoCoDataError, match=r"corrupt\.nii\.gz"):
        read_volume(corrupt)
    not_gzip = tmp_path / "plain_bytes.nii.gz"
    not_gzip.write_bytes(b"\x00" * 400)
    with pytest.raises(VoCoDataError, match=r"plain_bytes\.nii\.gz"):
        read_volume(not_gzip)


def test_two_d_volume(tmp_path):
    path = save_nifti(tmp_path / "slice.nii.gz", np.zeros((32, 32), np.float32))
    with _expect_error(path, "2-D .*expected a 3-D"):
        read_volume(path)


def test_four_d_with_several_channels(tmp_path):
    path = save_nifti(tmp_path / "multi.nii.gz", np.zeros((8, 8, 8, 3), np.float32))
    with _expect_error(path, "4-D .*3 channels"):
        read_volume(path)


def test_all_nan_and_non_finite(tmp_path):
    path = save_nifti(tmp_path / "nan.nii.gz", np.full((4, 4, 4), np.nan, np.float32))
    with _expect_error(path, "all voxels are NaN"):
        read_volume(path)
    data = np.zeros((4, 4, 4), np.float32)
    data[0, 0, :2] = np.inf
    path = save_nifti(tmp_path / "inf.nii.gz", data)
    with _expect_error(path, "2 voxels are NaN/inf"):
        read_volume(path)


def test_volume_smaller_than_crop(tmp_path):
    path = save_nifti(tmp_path / "small.nii.gz", np.zeros((40, 40, 20), np.float32))
    with _expect_error(path, r"smaller than the crop size \(48, 48, 48\)"):
        read_volume(path, min_shape=(48, 48, 48))
    check_min_shape(read_volume(path), (40, 40, 20))  # equal is fine


def test_image_label_shape_and_affine_mismatch(tmp_path, rotated_affine):
    image = read_volume(save_nifti(tmp_path / "img.nii.gz", np.zeros((8, 8, 8), np.float32)))
    wrong_shape = read_volume(save_nifti(tmp_path / "lab_shape.nii.gz",
                                         np.zeros((8, 8, 7), np.uint8)))
    with _expect_error(tmp_path / "lab_shape.nii.gz", "shape .* does not match"):
        check_pair(image, wrong_shape)
    wrong_affine = read_volume(save_nifti(tmp_path / "lab_affine.nii.gz",
                                          np.zeros((8, 8, 8), np.uint8), rotated_affine))
    with _expect_error(tmp_path / "lab_affine.nii.gz", "affine does not match"):
        check_pair(image, wrong_affine)


def test_write_refuses_bad_names_shapes_and_leaves_nothing(tmp_path):
    with pytest.raises(VoCoDataError, match=r"out\.png.*\.nii"):
        write_volume(tmp_path / "out.png", np.zeros((2, 2, 2)))
    with pytest.raises(VoCoDataError, match="2-D"):
        write_volume(tmp_path / "out.nii", np.zeros((2, 2)))
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(VoCoDataError, match="cannot write"):
        write_volume(blocker / "sub" / "out.nii", np.zeros((2, 2, 2)))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]


def test_failed_write_keeps_the_previous_file(tmp_path, monkeypatch):
    target = write_volume(tmp_path / "keep.nii.gz", np.ones((3, 3, 3), np.int16))
    before = target.read_bytes()

    def failing_save(image, filename):
        Path(filename).write_bytes(b"half")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("voco_core.data.io.nib.save", failing_save)
    with pytest.raises(VoCoDataError, match="No space left"):
        write_volume(target, np.zeros((3, 3, 3), np.int16))
    assert target.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keep.nii.gz"]


# ---------------------------------------------------------------- datalists


def test_datalist_from_flat_folder_sorted(tmp_path):
    for name in ["b.nii.gz", "a.nii", "notes.txt"]:
        (tmp_path / name).write_bytes(b"")
    entries = load_datalist(tmp_path)
    assert [e.image.name for e in entries] == ["a.nii", "b.nii.gz"]
    assert all(e.label is None for e in entries)


def test_datalist_from_decathlon_folder_and_json(phantom_dataset):
    from_folder = load_datalist(phantom_dataset, require_labels=True)
    from_json = load_datalist(phantom_dataset / "dataset.json", require_labels=True)
    assert from_folder == from_json
    assert len(from_json) == 3 and all(isinstance(e, DatalistEntry) for e in from_json)
    assert from_json[0].label.parent.name == "labelsTr"


def test_datalist_from_images_tr_without_json(tmp_path):
    (tmp_path / "imagesTr").mkdir()
    (tmp_path / "labelsTr").mkdir()
    for name in ["c1.nii.gz", "c2.nii.gz"]:
        (tmp_path / "imagesTr" / name).write_bytes(b"")
    (tmp_path / "labelsTr" / "c1.nii.gz").write_bytes(b"")
    entries = load_datalist(tmp_path)
    assert [(e.image.name, e.label and e.label.name) for e in entries] == [
        ("c1.nii.gz", "c1.nii.gz"), ("c2.nii.gz", None)]
    with _expect_error(tmp_path / "imagesTr" / "c2.nii.gz", "no label map"):
        load_datalist(tmp_path, require_labels=True)


def test_empty_folder(tmp_path):
    with _expect_error(tmp_path, "no NIfTI files"):
        load_datalist(tmp_path)


@pytest.mark.parametrize(
    ("content", "fragment"),
    [
        ("{not json", "not a readable JSON"),
        ('{"validation": []}', 'with a "training" list'),
        ('{"training": []}', "list is empty"),
        ('{"training": [{"label": "x.nii"}]}', r'training\[0\] must be'),
        ('{"training": [{"image": "missing.nii.gz"}]}', "not found"),
    ],
)
def test_bad_json_datalists(tmp_path, content, fragment):
    path = tmp_path / "dataset.json"
    path.write_text(content)
    with pytest.raises(VoCoDataError, match=fragment) as info:
        load_datalist(path)
    assert "dataset.json" in str(info.value) or "missing.nii.gz" in str(info.value)


def test_json_datalist_accepts_plain_strings_relative_to_json(tmp_path):
    (tmp_path / "img").mkdir()
    gzip.open(tmp_path / "img" / "x.nii.gz", "wb").close()
    path = tmp_path / "list.json"
    path.write_text(json.dumps({"training": ["img/x.nii.gz"]}))
    assert load_datalist(path)[0].image == (tmp_path / "img" / "x.nii.gz").resolve()
