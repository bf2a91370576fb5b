"""DICOM series, NRRD and MetaImage input: same arrays and geometry as NIfTI, and every
bad input one error line naming the file or folder."""

from __future__ import annotations

import json
import locale
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk

from voco_core.cli import main
from voco_core.data.datalists import load_datalist
from voco_core.data.io import check_volume_header, looks_like_labels, read_volume
from voco_core.data.readers.dicom import DICOM_POSITION_TOLERANCE_MM, list_dicom_series
from voco_core.errors import VoCoDataError

from conftest import one_line_error, save_nifti

SHAPE = (24, 20, 16)
FILE_SUFFIXES = (".nrrd", ".nhdr", ".mha", ".mhd")
FLIP_XY = np.diag([-1.0, -1.0, 1.0])  # RAS <-> LPS


@pytest.fixture(autouse=True)
def keep_the_process_locale():
    """GDCM's DICOM *writer* (only these tests write DICOM; reading does not) switches the
    process locale to "C", which turns Python's default text encoding into ASCII for
    every later test of the same worker: restore it."""
    saved = locale.setlocale(locale.LC_ALL, None)
    yield
    locale.setlocale(locale.LC_ALL, saved)


def ct_volume(seed: int = 0) -> np.ndarray:
    """int16 Hounsfield units, every voxel different enough to catch a transposed axis."""
    rng = np.random.default_rng(seed)
    return rng.integers(-1000, 1500, size=SHAPE).astype(np.int16)


def label_volume() -> np.ndarray:
    labels = np.zeros(SHAPE, dtype=np.uint8)
    labels[4:20, 3:17, 2:14] = 1
    labels[10:14, 8:12, 4:12] = 2
    return labels


def to_itk(array: np.ndarray, affine: np.ndarray) -> sitk.Image:
    """``array[i, j, k]`` with a RAS+ affine as an ITK image (LPS+, ``[k, j, i]`` buffer),
    written out independently of the code under test."""
    image = sitk.GetImageFromArray(np.ascontiguousarray(np.moveaxis(array, (0, 1, 2), (2, 1, 0))),
                                   isVector=array.ndim == 4)
    linear = FLIP_XY @ affine[:3, :3]
    spacing = np.linalg.norm(linear, axis=0)
    image.SetSpacing(spacing.tolist())
    image.SetDirection((linear / spacing).ravel().tolist())
    image.SetOrigin((FLIP_XY @ affine[:3, 3]).tolist())
    return image


def save_itk(path: Path, array: np.ndarray, affine: np.ndarray, compress: bool = False) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(to_itk(array, affine), str(path), useCompression=compress)
    return path


def save_dicom_series(folder: Path, array: np.ndarray, affine: np.ndarray, *,
                      series: str = "1", description: str = "phantom CT",
                      slices: list[int] | None = None) -> Path:
    """SimpleITK's "DicomSeriesFromArray" recipe: one CT file per ``k`` slice of a signed
    int16 ``array[i, j, k]``, with Image Position/Orientation (Patient), slice thickness,
    study/series/instance UIDs and rescale slope 1 / intercept 0. ``slices``: which
    ``k`` to write (default all)."""
    folder.mkdir(parents=True, exist_ok=True)
    image = to_itk(array, affine)
    d = image.GetDirection()
    orientation = "\\".join(f"{v:.10g}" for v in (d[0], d[3], d[6], d[1], d[4], d[7]))
    root = "1.2.826.0.1.3680043.2.1125.99"
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()  # keep the UIDs set below
    for k in range(array.shape[2]) if slices is None else slices:
        position = image.TransformIndexToPhysicalPoint((0, 0, k))
        plane = image[:, :, k]
        for tag, value in (
            ("0008|0060", "CT"), ("0008|0016", "1.2.840.10008.5.1.4.1.1.2"),
            ("0020|000d", f"{root}.{series}.1"), ("0020|000e", f"{root}.{series}.2"),
            ("0008|0018", f"{root}.{series}.3.{k + 1}"), ("0008|103e", description),
            ("0020|0037", orientation), ("0020|0032", "\\".join(f"{v:.10g}" for v in position)),
            ("0020|0013", str(k + 1)), ("0018|0050", f"{image.GetSpacing()[2]:.10g}"),
            ("0028|1052", "0"), ("0028|1053", "1"),
        ):
            plane.SetMetaData(tag, value)
        writer.SetFileName(str(folder / f"series{series}_slice{k:03d}.dcm"))
        writer.Execute(plane)
    return folder


def save_as(fmt: str, folder: Path, array: np.ndarray, affine: np.ndarray) -> Path:
    """``array`` saved as ``fmt`` (a suffix or ``"dicom"``) in its own subfolder (a
    ``.nhdr`` and a ``.mhd`` would otherwise share ``case.raw``)."""
    if fmt == "dicom":
        return save_dicom_series(folder / "dicom" / "case", array, affine)
    return save_itk(folder / fmt.lstrip(".") / f"case{fmt}", array, affine)


@pytest.mark.parametrize("fmt", [*FILE_SUFFIXES, "dicom"])
def test_every_format_reads_like_nifti(tmp_path, rotated_affine, fmt):
    data = ct_volume()
    nifti = read_volume(save_nifti(tmp_path / "case.nii.gz", data, rotated_affine))
    other = read_volume(save_as(fmt, tmp_path, data, rotated_affine))
    assert other.array.dtype == np.int16 and other.shape == SHAPE
    np.testing.assert_array_equal(other.array, nifti.array)
    atol = DICOM_POSITION_TOLERANCE_MM if fmt == "dicom" else 1e-4
    np.testing.assert_allclose(other.affine, nifti.affine, atol=1e-4)  # measured: < 1e-6
    assert np.abs(other.affine - nifti.affine).max() < atol
    assert other.spacing == pytest.approx(nifti.spacing, abs=1e-5)
    assert other.orientation == nifti.orientation == "LPS"
    assert other.name == "case" and other.header is None and other.intent == "none"


@pytest.mark.parametrize("fmt", [".nrrd", ".mha"])
def test_float_data_and_a_left_handed_ras_grid_keep_their_values(tmp_path, fmt):
    affine = np.diag([-1.5, 1.25, 3.0, 1.0])  # LAS: left-handed, still exact in NRRD/MHA
    affine[:3, 3] = [-10.0, 20.0, -30.5]
    data = np.random.default_rng(1).normal(size=SHAPE).astype(np.float32)
    record = read_volume(save_itk(tmp_path / f"mr{fmt}", data, affine, compress=True))
    assert record.array.dtype == np.float32 and record.orientation == "LAS"
    np.testing.assert_array_equal(record.array, data)
    np.testing.assert_allclose(record.affine, affine, atol=1e-6)


def test_dicom_of_a_left_handed_grid_is_the_same_world_picture_stored_reversed(tmp_path):
    """DICOM's slice axis is always the row x column normal: a volume whose k axis
    points the other way comes back with k reversed, each voxel at the same place."""
    affine = np.diag([-1.5, 1.25, 3.0, 1.0])  # LAS: i x j points to -z, k to +z
    affine[:3, 3] = [-10.0, 20.0, -30.5]
    data = ct_volume()
    record = read_volume(save_dicom_series(tmp_path / "ras", data, affine))
    np.testing.assert_array_equal(record.array, data[:, :, ::-1])
    last_slice = affine @ [0, 0, SHAPE[2] - 1, 1]
    np.testing.assert_allclose(record.affine @ [0, 0, 0, 1], last_slice, atol=1e-4)
    np.testing.assert_allclose(record.affine[:3, 2], -affine[:3, 2], atol=1e-4)


def test_label_map_decision_without_a_nifti_header(tmp_path, rotated_affine):
    seg = read_volume(save_itk(tmp_path / "liver_seg.nrrd", label_volume(), rotated_affine))
    assert looks_like_labels(seg) == (True, "file name 'liver_seg'")
    plain = read_volume(save_itk(tmp_path / "case.mha", label_volume(), rotated_affine))
    assert looks_like_labels(plain) == (True, "3 distinct non-negative integer values")
    ct = read_volume(save_dicom_series(tmp_path / "ct", ct_volume(), rotated_affine))
    assert looks_like_labels(ct)[0] is False


@pytest.mark.parametrize("fmt", [".nrrd", ".mhd", "dicom"])
def test_voco_info_and_header_check_on_each_format(tmp_path, rotated_affine, capsys, fmt):
    path = save_as(fmt, tmp_path, ct_volume(), rotated_affine)
    assert check_volume_header(path, min_shape=(16, 16, 16)) == SHAPE
    with pytest.raises(VoCoDataError, match=r"smaller than the crop size \(32, 32, 32\)"):
        check_volume_header(path, min_shape=(32, 32, 32))
    assert main(["info", str(path), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["shape"] == list(SHAPE) and summary["orientation"] == "LPS"
    assert summary["spacing_mm"] == pytest.approx([0.8, 0.8, 2.5])
    assert summary["kind"] == "image" and summary["file"] == str(path)
    assert main(["info", str(path)]) == 0
    assert "24 x 20 x 16 voxels (int16)" in capsys.readouterr().out


def test_datalist_of_a_mixed_folder(tmp_path, rotated_affine):
    data = ct_volume()
    save_nifti(tmp_path / "a.nii.gz", data, rotated_affine)
    save_itk(tmp_path / "b.nrrd", data, rotated_affine)
    save_itk(tmp_path / "c.mhd", data, rotated_affine)  # + c.raw, not a volume itself
    save_itk(tmp_path / "d.mha", data, rotated_affine)
    save_dicom_series(tmp_path / "e_series", data, rotated_affine)
    (tmp_path / "notes.txt").write_text("not a volume")
    (tmp_path / "empty_folder").mkdir()
    entries = load_datalist(tmp_path)
    assert [e.image.name for e in entries] == ["a.nii.gz", "b.nrrd", "c.mhd", "d.mha",
                                                "e_series"]
    names = [read_volume(e.image).name for e in entries]
    assert names == ["a", "b", "c", "d", "e_series"]


def test_datalist_pairs_labels_by_name_and_json_entries_name_any_format(tmp_path,
                                                                       rotated_affine):
    save_itk(tmp_path / "imagesTr" / "case1.nrrd", ct_volume(), rotated_affine)
    save_itk(tmp_path / "labelsTr" / "case1.nrrd", label_volume(), rotated_affine)
    save_dicom_series(tmp_path / "imagesTr" / "case2", ct_volume(1), rotated_affine)
    entries = load_datalist(tmp_path)
    assert [(e.image.name, e.label and e.label.name) for e in entries] == [
        ("case1.nrrd", "case1.nrrd"), ("case2", None)]

    (tmp_path / "dataset.json").write_text(json.dumps({"training": [
        {"image": "imagesTr/case2", "label": "labelsTr/case1.nrrd"},
        {"image": "imagesTr/case1.nrrd"}]}))
    entries = load_datalist(tmp_path)
    assert [e.image for e in entries] == [(tmp_path / "imagesTr" / "case2").resolve(),
                                          (tmp_path / "imagesTr" / "case1.nrrd").resolve()]
    assert entries[0].label.name == "case1.nrrd"
    (tmp_path / "dataset.json").write_text(json.dumps({"training": ["imagesTr/absent.mha"]}))
    with pytest.raises(VoCoDataError, match=r"absent\.mha: image file not found"):
        load_datalist(tmp_path)


def test_napari_reader_opens_nrrd_and_a_dicom_folder(tmp_path, rotated_affine):
    pytest.importorskip("napari")
    from napari_voco._io import RAS_TO_DISPLAY, get_reader

    nrrd = save_itk(tmp_path / "organs_labels.nrrd", label_volume(), rotated_affine)
    dicom = save_dicom_series(tmp_path / "ct_series", ct_volume(), rotated_affine)
    (tmp_path / "plain_folder").mkdir()
    (tmp_path / "plain_folder" / "readme.txt").write_text("no DICOM here")
    assert get_reader(str(tmp_path / "plain_folder")) is None
    assert get_reader(str(tmp_path / "notes.nrrd.txt")) is None
    [(labels, labels_kwargs, labels_type)] = get_reader(str(nrrd))(str(nrrd))
    [(ct, ct_kwargs, ct_type)] = get_reader(str(dicom))(str(dicom))
    assert (labels_type, ct_type) == ("labels", "image")
    assert (labels_kwargs["name"], ct_kwargs["name"]) == ("organs_labels", "ct_series")
    # shown axial (the LPS file's axes reversed: S, P, L), stored as on disk
    np.testing.assert_array_equal(labels, label_volume().transpose(2, 1, 0))
    np.testing.assert_array_equal(ct, ct_volume().transpose(2, 1, 0))
    for kwargs in (labels_kwargs, ct_kwargs):
        np.testing.assert_allclose(kwargs["affine"],
                                   RAS_TO_DISPLAY @ rotated_affine[:, [2, 1, 0, 3]], atol=1e-4)
        np.testing.assert_allclose(kwargs["metadata"]["voco"]["storage"]["affine"],
                                   rotated_affine, atol=1e-4)
        assert kwargs["metadata"]["voco"]["orientation"] == "LPS"


@pytest.mark.gui
@pytest.mark.filterwarnings("ignore:Non-orthogonal slicing")
def test_viewer_opens_a_dicom_folder_and_an_nrrd_overlaying_in_world_mm(
        make_napari_viewer_proxy, tmp_path, rotated_affine):
    from napari_voco._io import RAS_TO_DISPLAY

    dicom = save_dicom_series(tmp_path / "ct_series", ct_volume(), rotated_affine)
    nrrd = save_itk(tmp_path / "ct_series_labels.nrrd", label_volume(), rotated_affine)
    viewer = make_napari_viewer_proxy()
    [image] = viewer.open(dicom, plugin="napari-voco")
    [labels] = viewer.open(nrrd, plugin="napari-voco")
    assert (image._type_string, labels._type_string) == ("image", "labels")
    assert image.name == "ct_series"
    for layer in (image, labels):
        np.testing.assert_allclose(layer._data_to_world.affine_matrix,
                                   RAS_TO_DISPLAY @ rotated_affine[:, [2, 1, 0, 3]], atol=1e-4)


def test_napari_manifest_offers_the_formats_and_folders():
    npe2 = pytest.importorskip("npe2")
    [reader] = npe2.PluginManifest.from_distribution("napari-voco").contributions.readers
    assert {"*.nrrd", "*.nhdr", "*.mha", "*.mhd", "*.nii", "*.nii.gz"} <= set(
        reader.filename_patterns)
    assert reader.accepts_directories


def test_predict_on_mha_writes_nifti_and_mha_on_the_input_grid(finetune_run, train_dataset,
                                                                tmp_path, capsys):
    source = nib.load(train_dataset / "imagesTr" / "phantom_002.nii.gz")
    mha = save_itk(tmp_path / "in" / "phantom_002.mha", np.asanyarray(source.dataobj),
                   source.affine)
    out = tmp_path / "pred"
    assert main(["predict", "--checkpoint", str(finetune_run), "--input", str(mha.parent),
                 "--out", str(out), "--device", "cpu"]) == 0
    printed = capsys.readouterr().out
    assert f"phantom_002.mha -> {out / 'phantom_002_seg.nii.gz'} and phantom_002_seg.mha" in printed
    assert sorted(p.name for p in out.iterdir()) == ["phantom_002_seg.mha",
                                                     "phantom_002_seg.nii.gz"]
    written = nib.load(out / "phantom_002_seg.nii.gz")
    np.testing.assert_allclose(written.affine, read_volume(mha).affine, atol=1e-6)
    np.testing.assert_allclose(written.affine, source.affine, atol=1e-4)
    native = read_volume(out / "phantom_002_seg.mha")
    np.testing.assert_array_equal(native.array, np.asanyarray(written.dataobj))
    np.testing.assert_allclose(native.affine, written.affine, atol=1e-6)

    bad = tmp_path / "bad.mha"
    bad.write_bytes(mha.read_bytes()[:-500])
    assert main(["predict", "--checkpoint", str(finetune_run), "--input", str(bad),
                 "--out", str(tmp_path / "nothing"), "--device", "cpu"]) == 1
    one_line_error(capsys, str(bad), "truncated")
    assert not any((tmp_path / "nothing").glob("*"))  # nothing half-written


# --------------------------------------------------------------------------- bad input


def _truncated(path: Path, keep: int) -> Path:
    path.write_bytes(path.read_bytes()[:keep])
    return path


def _bad_nrrd_truncated(tmp: Path, affine) -> Path:
    return _truncated(save_itk(tmp / "cut.nrrd", ct_volume(), affine), 2000)


def _bad_mha_truncated(tmp: Path, affine) -> Path:
    return _truncated(save_itk(tmp / "cut.mha", ct_volume(), affine), 2000)


def _bad_mha_garbage(tmp: Path, affine) -> Path:
    path = tmp / "garbage.mha"
    path.write_bytes(b"\x00\x13 this is not a MetaImage header\n" * 20)
    return path


def _damaged(path: Path) -> Path:
    raw = bytearray(path.read_bytes())
    raw[1000:1200] = b"\xff" * 200  # inside the compressed voxel data
    path.write_bytes(bytes(raw))
    return path


def _bad_nrrd_gzip_corrupt(tmp: Path, affine) -> Path:
    return _damaged(save_itk(tmp / "corrupt.nrrd", ct_volume(), affine, compress=True))


def _bad_mha_zlib_corrupt(tmp: Path, affine) -> Path:
    return _damaged(save_itk(tmp / "corrupt.mha", ct_volume(), affine, compress=True))


def _bad_mha_zlib_truncated(tmp: Path, affine) -> Path:
    return _truncated(save_itk(tmp / "short.mha", ct_volume(), affine, compress=True), 5000)


def _bad_mhd_huge_claim(tmp: Path, affine) -> Path:
    path = save_itk(tmp / "huge.mhd", ct_volume(), affine)
    text = path.read_text().replace("DimSize = 24 20 16", "DimSize = 24000 20000 16000")
    path.write_text(text)
    return path


def _bad_nrrd_2d(tmp: Path, affine) -> Path:
    path = tmp / "plane.nrrd"
    sitk.WriteImage(sitk.GetImageFromArray(np.zeros((20, 24), np.int16)), str(path))
    return path


def _bad_nrrd_4d(tmp: Path, affine) -> Path:
    path = tmp / "timeseries.nrrd"
    volume = to_itk(np.zeros(SHAPE, np.float32), affine)
    sitk.WriteImage(sitk.JoinSeries([volume] * 3), str(path))
    return path


def _bad_mha_vector(tmp: Path, affine) -> Path:
    return save_itk(tmp / "rgb.mha", np.zeros((*SHAPE, 3), np.uint8), affine)


def _bad_nrrd_nan(tmp: Path, affine) -> Path:
    data = ct_volume().astype(np.float32)
    data[3, 4, 5] = np.nan
    return save_itk(tmp / "nan.nrrd", data, affine)


def _bad_folder_without_dicom(tmp: Path, affine) -> Path:
    (tmp / "empty_study").mkdir()
    (tmp / "empty_study" / "readme.txt").write_text("no images")
    return tmp / "empty_study"


def _bad_two_series(tmp: Path, affine) -> Path:
    folder = save_dicom_series(tmp / "study", ct_volume(), affine, series="1",
                               description="abdomen")
    return save_dicom_series(folder, ct_volume(), affine, series="2", description="thorax",
                             slices=[0, 1, 2])


def _bad_single_slice_dicom(tmp: Path, affine) -> Path:
    return save_dicom_series(tmp / "one_slice", ct_volume(), affine, slices=[5])


def _bad_dicom_missing_slice(tmp: Path, affine) -> Path:
    kept = [k for k in range(SHAPE[2]) if k != 7]
    return save_dicom_series(tmp / "gap", ct_volume(), affine, slices=kept)


def _bad_dicom_truncated_slice(tmp: Path, affine) -> Path:
    folder = save_dicom_series(tmp / "cut_series", ct_volume(), affine)
    _truncated(folder / "series1_slice015.dcm", 600)
    return folder


BAD_INPUTS = {
    "nrrd truncated": (_bad_nrrd_truncated, "is truncated"),
    "mha truncated": (_bad_mha_truncated, "is truncated"),
    "mha garbage": (_bad_mha_garbage, "cannot be read as MetaImage"),
    "nrrd gzip corrupt": (_bad_nrrd_gzip_corrupt, "truncated or corrupt"),
    "mha zlib corrupt": (_bad_mha_zlib_corrupt, "is corrupt: its compressed voxel data"),
    "mha zlib truncated": (_bad_mha_zlib_truncated, "is corrupt or truncated"),
    "mhd claims more than its raw file": (_bad_mhd_huge_claim, "is truncated: the header "
                                          "claims 15,360,000,000,000 bytes"),
    "nrrd 2-D": (_bad_nrrd_2d, "is 2-D with size (24, 20), expected a 3-D image volume"),
    "nrrd 4-D": (_bad_nrrd_4d, "is 4-D with size (24, 20, 16, 3) (3 channels or time points)"),
    "mha vector pixels": (_bad_mha_vector, "has 3 components per voxel"),
    "nrrd NaN": (_bad_nrrd_nan, "1 voxels are NaN/inf; expected finite image values"),
    "folder without DICOM": (_bad_folder_without_dicom, "is a folder holding no DICOM series"),
    "two DICOM series": (_bad_two_series, "holds 2 DICOM series, expected one per folder"),
    "single-slice DICOM": (_bad_single_slice_dicom, "has a single slice (a 2-D image)"),
    "DICOM with a missing slice": (_bad_dicom_missing_slice, "evenly spaced"),
    "DICOM with a truncated slice": (_bad_dicom_truncated_slice, "1 DICOM file(s) are not "
                                     "part of the readable series"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_is_one_line_naming_it(tmp_path, rotated_affine, capsys, case):
    make, fragment = BAD_INPUTS[case]
    path = make(tmp_path, rotated_affine)
    assert main(["info", str(path)]) == 1
    one_line_error(capsys, f"{path}: ", fragment)
    with pytest.raises(VoCoDataError, match="^" + str(path).replace("\\", "\\\\")):
        read_volume(path)


def test_several_series_are_listed_with_uid_description_and_file_count(tmp_path,
                                                                        rotated_affine):
    folder = _bad_two_series(tmp_path, rotated_affine)
    series = {s.description: len(s.files) for s in list_dicom_series(folder)}
    assert series == {"abdomen": SHAPE[2], "thorax": 3}
    with pytest.raises(VoCoDataError) as error:
        read_volume(folder)
    message = str(error.value)
    assert "'abdomen' (16 files)" in message and "'thorax' (3 files)" in message
    assert "1.2.826.0.1.3680043.2.1125.99.1.2" in message and "\n" not in message


def test_a_folder_of_dicom_series_subfolders_is_not_a_series(tmp_path, rotated_affine):
    save_dicom_series(tmp_path / "study" / "ct", ct_volume(), rotated_affine)
    with pytest.raises(VoCoDataError, match="is a folder holding no DICOM series"):
        read_volume(tmp_path / "study")
