"""NIfTI I/O round trips, datalists, and every bad input giving a typed error."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from voco_core.data.datalists import (
    DatalistEntry,
    dataset_class_names,
    load_datalist,
    read_dataset_json,
)
from voco_core.data.io import (
    VolumeRecord,
    check_min_shape,
    check_pair,
    check_volume_header,
    looks_like_labels,
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
    assert label.has_integer_dtype and label.array.dtype == np.uint8
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
    record = read_volume(path)  # an image with 3 channels, last (see test_channels.py)
    assert record.shape == (8, 8, 8) and record.channels == 3
    with _expect_error(path, "4-D .*3 channels.*one channel"):
        read_volume(path, kind="label map")
    five = save_nifti(tmp_path / "five.nii.gz", np.zeros((8, 8, 8, 2, 3), np.float32))
    with _expect_error(five, "5-D .*expected a 3-D image volume or a 4-D one"):
        read_volume(five)


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


def test_dataset_json_read_from_folder_or_path_and_empty_when_none(phantom_dataset, tmp_path):
    spec = read_dataset_json(phantom_dataset)
    assert spec == read_dataset_json(phantom_dataset / "dataset.json")
    assert spec["labels"]["0"] == "background"
    assert read_dataset_json(tmp_path) == {}  # folder without dataset.json
    assert read_dataset_json(phantom_dataset / "imagesTr" / "phantom_000.nii.gz") == {}
    assert read_dataset_json([DatalistEntry(Path("x.nii.gz"))]) == {}
    broken = tmp_path / "broken.json"
    broken.write_text('{"training": [')
    with _expect_error(broken, "not a readable JSON"):
        read_dataset_json(broken)
    with _expect_error(tmp_path / "absent.json", "not found"):
        read_dataset_json(tmp_path / "absent.json")


def test_dataset_class_names_in_index_order(phantom_dataset, tmp_path):
    from voco_core.data.phantoms import LABEL_NAMES

    assert dataset_class_names(phantom_dataset) == tuple(LABEL_NAMES[i] for i in range(11))
    path = tmp_path / "dataset.json"
    path.write_text(json.dumps({"labels": {"1": "liver", "0": "background", "2": "tumour"}}))
    assert dataset_class_names(tmp_path) == ("background", "liver", "tumour")
    path.write_text(json.dumps({"labels": {"background": 0, "liver": 1}}))  # nnU-Net v2
    assert dataset_class_names(path) == ("background", "liver")
    path.write_text(json.dumps({"training": []}))
    assert dataset_class_names(path) == ()


@pytest.mark.parametrize(
    ("labels", "fragment"),
    [
        ({"0": "background", "2": "liver"}, r"indices must be the classes 0\.\.1.*\[0, 2\]"),
        ({"1": "liver"}, r"0\.\.0.*got \[1\]"),
        ({"0": "background", "x": "liver"}, "'x': 'liver'"),
        ({"0": "background", "1": ""}, "'1': ''"),
        (["background", "liver"], "expected a \"labels\" object"),
        ({"whole tumour": [1, 2, 3]}, "whole tumour"),
    ],
)
def test_dataset_class_names_refuses_a_bad_labels_map(tmp_path, labels, fragment):
    path = tmp_path / "dataset.json"
    path.write_text(json.dumps({"labels": labels}))
    with _expect_error(path, fragment):
        dataset_class_names(tmp_path)


# ---------------------------------------------------------------- size claimed by the header


def _lying_header_file(path: Path, shape, dtype=np.float32, payload_bytes: int = 4000) -> Path:
    """A NIfTI file whose header claims ``shape`` but which holds ``payload_bytes``."""
    header = nib.Nifti1Header()
    header.set_data_shape(shape)
    header.set_data_dtype(dtype)
    header["vox_offset"] = 352
    raw = header.binaryblock + b"\0" * 4 + bytes(payload_bytes)
    if path.name.endswith(".gz"):
        raw = gzip.compress(raw)
    path.write_bytes(raw)
    return path


@pytest.mark.parametrize("suffix", [".nii", ".nii.gz"])
def test_header_claiming_more_data_than_the_file_holds_is_refused_before_reading(
        tmp_path, monkeypatch, suffix):
    path = _lying_header_file(tmp_path / f"liar{suffix}", (2000, 2000, 2000))
    size = path.stat().st_size

    def no_voxel_read(*args, **kwargs):
        raise AssertionError("voxel data was read")

    monkeypatch.setattr(nib.arrayproxy.ArrayProxy, "__array__", no_voxel_read)
    for reader in (read_volume, check_volume_header):
        with pytest.raises(VoCoDataError) as info:
            reader(path)
        message = str(info.value)
        assert str(path) in message and "(2000, 2000, 2000)" in message
        assert "float32" in message and f"{size:,} " in message
        assert "\n" not in message


def test_highly_compressible_volume_is_not_mistaken_for_a_lying_header(tmp_path, monkeypatch):
    monkeypatch.setattr(nib.openers.Opener, "default_compresslevel", 9)  # deflate's best ratio
    path = tmp_path / "empty_mask.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((160, 160, 128), np.uint8), np.eye(4)), path)
    assert (160 * 160 * 128) / path.stat().st_size > 1000  # close to the 1032x bound
    assert read_volume(path).shape == (160, 160, 128)


def test_truncated_uncompressed_file_refused_from_its_size(tmp_path):
    good = save_nifti(tmp_path / "good.nii", np.ones((16, 16, 16), np.float32))
    cut = tmp_path / "cut.nii"
    cut.write_bytes(good.read_bytes()[:5000])
    with _expect_error(cut, r"is truncated: .*\(16, 16, 16\) of float32.*holds 5,000 bytes"):
        read_volume(cut)


def test_empty_axis_and_rgb_voxels_are_refused(tmp_path):
    empty = _lying_header_file(tmp_path / "empty.nii", (0, 8, 8), payload_bytes=0)
    with _expect_error(empty, r"empty axis: shape \(0, 8, 8\)"):
        read_volume(empty)
    rgb = np.zeros((4, 4, 4), dtype=[("R", "u1"), ("G", "u1"), ("B", "u1")])
    path = tmp_path / "rgb.nii.gz"
    nib.save(nib.Nifti1Image(rgb, np.eye(4)), path)
    with _expect_error(path, "voxel type .*one number per voxel"):
        read_volume(path)


# ---------------------------------------------------------------- symbolic links


def _loop(folder: Path, name: str) -> Path:
    """``name`` -> ``name.other`` -> ``name``: a link that never resolves."""
    link, other = folder / name, folder / f"{name}.other"
    link.symlink_to(other.name)
    other.symlink_to(link.name)
    return link


def test_looping_and_dangling_links_are_named_by_every_reader_and_datalist(tmp_path):
    loop = _loop(tmp_path, "loop.nii.gz")
    with _expect_error(loop, "broken symbolic link: it loops"):
        read_volume(loop)
    with _expect_error(loop, "broken symbolic link: it loops"):
        load_datalist(tmp_path)  # flat folder listing

    dataset = tmp_path / "decathlon"
    (dataset / "imagesTr").mkdir(parents=True)
    (dataset / "labelsTr").mkdir()
    save_nifti(dataset / "imagesTr" / "case.nii.gz", np.zeros((4, 4, 4), np.float32))
    dangling = dataset / "labelsTr" / "case.nii.gz"
    dangling.symlink_to("/nonexistent/case.nii.gz")
    with _expect_error(dangling, "broken symbolic link: it points to a missing file"):
        load_datalist(dataset)

    listing = tmp_path / "list.json"
    _loop(tmp_path, "listed.nii")
    listing.write_text(json.dumps({"training": [{"image": "listed.nii"}]}))
    with _expect_error(tmp_path / "listed.nii", r"loops .*listed in list\.json as training\[0\]"):
        load_datalist(listing)

    json_loop = _loop(tmp_path / "decathlon", "dataset.json")
    with _expect_error(json_loop, "broken symbolic link: it loops"):
        load_datalist(json_loop.parent)


# ---------------------------------------------------------------- image or label map


def _record(array: np.ndarray, name: str = "volume.nii.gz", intent: str | None = None):
    header = nib.Nifti1Header()
    if intent is not None:
        header.set_intent(intent)
    return VolumeRecord(array, np.eye(4), (1.0, 1.0, 1.0), Path("/data") / name, header)


def _mri_like_uint8(shape=(48, 48, 32)) -> np.ndarray:
    """Smooth intensities over nearly the whole 8-bit range, as a scaled MRI has."""
    i, j, k = np.meshgrid(*(np.linspace(0, 1, n) for n in shape), indexing="ij")
    smooth = 0.5 + 0.25 * np.sin(6 * i) * np.cos(5 * j) + 0.24 * np.sin(4 * k + 3 * i)
    return np.round(smooth.clip(0, 1) * 255).astype(np.uint8)


def test_eight_bit_mri_opens_as_an_image():
    mri = _mri_like_uint8()
    assert 200 <= np.unique(mri).size <= 256
    as_labels, reason = looks_like_labels(_record(mri, "t1.nii.gz"))
    assert not as_labels and "distinct" in reason
    # FreeSurfer's brainmask and a "masked" T1 are grey-value images, not masks
    assert not looks_like_labels(_record(mri, "brainmask.nii.gz"))[0]
    assert not looks_like_labels(_record(mri, "t1_masked.nii.gz"))[0]


def test_label_map_named_like_one_opens_as_labels_with_many_values():
    atlas = (np.arange(48 * 48 * 32) % 117).reshape(48, 48, 32).astype(np.uint8)
    for name in ["atlas_labels.nii.gz", "liver_seg.nii", "case01-mask.nii.gz",
                 "aparc+aseg.nii.gz", "liverMask.nii.gz", "sub-01_dseg.nii.gz"]:
        as_labels, reason = looks_like_labels(_record(atlas, name))
        assert as_labels, name
        assert "file name" in reason
    assert looks_like_labels(_record(atlas, "labelsTr/case_001.nii.gz"))[1] == "folder 'labelsTr'"
    assert not looks_like_labels(_record(atlas, "case_001.nii.gz"))[0]  # too many for data alone


def test_ct_and_floating_point_data_open_as_images():
    ct = np.full((16, 16, 16), -1000, np.int16)
    ct[4:12, 4:12, 4:12] = 40
    as_labels, reason = looks_like_labels(_record(ct, "ct.nii.gz"))
    assert not as_labels and "negative" in reason
    probabilities = np.random.default_rng(0).uniform(size=(8, 8, 8)).astype(np.float32)
    as_labels, reason = looks_like_labels(_record(probabilities, "liver_mask.nii.gz"))
    assert not as_labels and "not non-negative whole numbers" in reason


def test_label_intent_decides_first():
    mri = _mri_like_uint8()
    assert looks_like_labels(_record(mri, "t1.nii.gz", intent="label")) == (
        True, "NIfTI intent 'label'")
    assert looks_like_labels(_record(mri.astype(np.float32), intent="neuroname"))[0]
    few_values = (mri // 64).astype(np.int16)  # 4 values: labels by data alone ...
    assert looks_like_labels(_record(few_values))[0]
    as_labels, reason = looks_like_labels(_record(few_values, intent="estimate"))
    # ... unless the header says otherwise
    assert not as_labels and "'estimate' is not a label intent" in reason


def test_phantom_label_maps_open_as_labels_and_images_as_images(phantom_dataset):
    for entry in load_datalist(phantom_dataset, require_labels=True):
        assert looks_like_labels(read_volume(entry.label))[0]
        assert not looks_like_labels(read_volume(entry.image))[0]
    summary = read_volume(entry.label).describe()
    assert summary["kind"] == "label map" and "label_voxels" in summary
    assert read_volume(entry.image).describe()["kind"] == "image"


def test_label_intent_is_read_from_the_file(tmp_path):
    image = nib.Nifti1Image(_mri_like_uint8(), np.eye(4))
    image.header.set_intent("label")
    nib.save(image, tmp_path / "t1.nii.gz")
    record = read_volume(tmp_path / "t1.nii.gz")
    assert record.intent == "label" and looks_like_labels(record)[0]
