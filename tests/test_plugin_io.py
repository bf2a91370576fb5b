"""napari plugin I/O: NIfTI reader, writers, sample data and error notifications."""

from __future__ import annotations

import gzip
import logging
import re
import time

import nibabel as nib
import numpy as np
import pytest

pytest.importorskip("napari")

from napari_voco import _notify
from napari_voco._io import (
    CT_WINDOW_HU,
    DISPLAY_TO_RAS,
    RAS_TO_DISPLAY,
    get_reader,
    label_storage_dtype,
    layer_voxel_to_world,
    read_volumes,
    write_image,
    write_labels,
)
from napari_voco._sample_data import make_phantom_sample
from voco_core.data.phantoms import LABEL_NAMES
from voco_core.errors import VoCoConfigError, VoCoDataError

from conftest import save_nifti

SHAPE = (24, 20, 16)


def ras_affine() -> np.ndarray:
    """1.5 x 1.5 x 2 mm RAS voxels with an offset origin."""
    affine = np.diag([1.5, 1.5, 2.0, 1.0])
    affine[:3, 3] = [-18.0, -15.0, 10.0]
    return affine


def ct_volume(seed: int = 0) -> np.ndarray:
    """int16 Hounsfield units: air (-1000) around a soft-tissue block with a bright bone bar."""
    rng = np.random.default_rng(seed)
    ct = np.full(SHAPE, -1000, dtype=np.int16)
    ct[4:20, 3:17, 2:14] = rng.integers(0, 80, size=(16, 14, 12))
    ct[10:14, 8:12, :] = 700
    return ct


def label_volume() -> np.ndarray:
    labels = np.zeros(SHAPE, dtype=np.uint8)
    labels[4:20, 3:17, 2:14] = 1
    labels[10:14, 8:12, 4:12] = 2
    labels[5:8, 4:7, 3:6] = 7
    return labels


@pytest.fixture(params=["ras", "rotated"])
def affine(request, rotated_affine) -> np.ndarray:
    return ras_affine() if request.param == "ras" else rotated_affine


# --------------------------------------------------------------------------- reader hook


def test_get_reader_returns_none_for_paths_it_does_not_handle(tmp_path):
    text = tmp_path / "notes.txt"
    text.write_text("not an image")
    nifti = save_nifti(tmp_path / "a.nii.gz", label_volume())
    folder_named_like_nifti = tmp_path / "scan.nii"
    folder_named_like_nifti.mkdir()
    assert get_reader(str(text)) is None
    assert get_reader(str(tmp_path)) is None
    assert get_reader(str(folder_named_like_nifti)) is None
    assert get_reader([str(nifti), str(text)]) is None
    assert get_reader([]) is None
    assert get_reader(42) is None  # type: ignore[arg-type]
    assert get_reader(str(tmp_path / "image.nii.gz.bak")) is None


def test_get_reader_accepts_nifti_files_and_lists_of_them(tmp_path):
    gz = save_nifti(tmp_path / "a.nii.gz", label_volume())
    plain = save_nifti(tmp_path / "b.nii", ct_volume())
    assert callable(get_reader(str(gz)))
    assert callable(get_reader(str(plain)))
    reader = get_reader([str(gz), str(plain)])
    layers = reader([str(gz), str(plain)])
    assert [layer_type for _, _, layer_type in layers] == ["labels", "image"]
    assert [kwargs["name"] for _, kwargs, _ in layers] == ["a", "b"]


# --------------------------------------------------------------------------- reading


def lps_to_display(array: np.ndarray) -> np.ndarray:
    """``rotated_affine`` stores voxels L, P, S (with a 10 degree tilt): the display
    order S, P, L is the reversed axes, no flips."""
    return array.transpose(2, 1, 0)


def test_label_map_opens_as_labels_with_its_geometry(tmp_path, rotated_affine):
    path = save_nifti(tmp_path / "organs.nii.gz", label_volume(), rotated_affine)
    [(data, kwargs, layer_type)] = read_volumes(str(path))
    assert layer_type == "labels"
    # display order (axial slices on the slider), and the voxel -> RAS affine of that
    # array: the file's affine with its columns in the same order
    np.testing.assert_array_equal(data, lps_to_display(label_volume()))
    display_affine = rotated_affine[:, [2, 1, 0, 3]]
    np.testing.assert_allclose(kwargs["affine"], RAS_TO_DISPLAY @ display_affine, atol=1e-5)
    assert kwargs["axis_labels"] == ("S", "P", "L") and kwargs["units"] == "mm"
    voco = kwargs["metadata"]["voco"]
    assert voco["path"] == str(path)
    assert voco["orientation"] == "".join(nib.aff2axcodes(rotated_affine))  # the file's
    assert voco["orientation"] != "RAS"
    np.testing.assert_allclose(voco["spacing"], [2.5, 0.8, 0.8], atol=1e-5)
    np.testing.assert_allclose(voco["affine"], display_affine, atol=1e-5)
    assert voco["shape"] == list(SHAPE[::-1])
    storage = voco["storage"]
    np.testing.assert_allclose(storage["affine"], rotated_affine, atol=1e-5)
    assert storage["shape"] == list(SHAPE) and storage["dtype"] == "uint8"
    assert "contrast_limits" not in kwargs


def test_ct_opens_as_image_with_ct_window_and_rotated_affine(tmp_path, rotated_affine):
    path = save_nifti(tmp_path / "ct.nii.gz", ct_volume(), rotated_affine)
    [(data, kwargs, layer_type)] = read_volumes(str(path))
    assert layer_type == "image"  # int16, but negative HU: not a label map
    assert data.dtype == np.int16
    np.testing.assert_array_equal(data, lps_to_display(ct_volume()))
    np.testing.assert_allclose(kwargs["affine"],
                               RAS_TO_DISPLAY @ rotated_affine[:, [2, 1, 0, 3]], atol=1e-5)
    assert kwargs["contrast_limits"] == CT_WINDOW_HU


def test_reader_uses_the_core_image_or_labels_rule(tmp_path):
    """8-bit MRI-like grey values open as an Image, a 117-region uint8 atlas named as a
    label map as Labels, int16 CT as an Image (voco_core.data.looks_like_labels)."""
    rng = np.random.default_rng(4)
    mri = rng.normal(100, 30, SHAPE).clip(0, 255).astype(np.uint8)  # ~200 grey values
    atlas = (np.arange(np.prod(SHAPE)).reshape(SHAPE) % 117).astype(np.uint8)
    cases = [("t1_brain.nii.gz", mri, "image"), ("atlas_labels.nii.gz", atlas, "labels"),
             ("ct.nii.gz", ct_volume(), "image")]
    for name, data, expected in cases:
        [(_, _, layer_type)] = read_volumes(str(save_nifti(tmp_path / name, data)))
        assert layer_type == expected, name


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        (np.random.default_rng(1).normal(size=SHAPE).astype(np.float32), "image"),
        (np.random.default_rng(2).integers(0, 3000, SHAPE).astype(np.uint16), "image"),
        (np.random.default_rng(3).integers(0, 40, SHAPE).astype(np.int32), "labels"),
        (np.arange(np.prod(SHAPE)).reshape(SHAPE) % 2 == 0, "labels"),
    ],
    ids=["float-mr", "uint16-mr", "int32-labels", "bool-mask"],
)
def test_layer_type_rule(tmp_path, data, expected):
    stored = data.astype(np.uint8) if data.dtype == np.bool_ else data
    path = save_nifti(tmp_path / "v.nii.gz", stored)
    [(layer_data, kwargs, layer_type)] = read_volumes(str(path))
    assert layer_type == expected
    assert "contrast_limits" not in kwargs  # none of these spans the CT window
    if expected == "labels":
        assert np.issubdtype(layer_data.dtype, np.integer)


def test_decathlon_label_names_become_layer_features(phantom_dataset):
    [(_, kwargs, layer_type)] = read_volumes(
        str(phantom_dataset / "labelsTr" / "phantom_000.nii.gz"))
    assert layer_type == "labels"
    assert kwargs["metadata"]["voco"]["label_names"] == LABEL_NAMES
    assert list(kwargs["features"]["name"]) == [LABEL_NAMES[v] for v in sorted(LABEL_NAMES)]
    [(_, image_kwargs, image_type)] = read_volumes(
        str(phantom_dataset / "imagesTr" / "phantom_000.nii.gz")
    )
    assert image_type == "image" and "features" not in image_kwargs


@pytest.mark.parametrize("damage", ["garbage", "truncated"])
def test_corrupt_file_raises_typed_error_naming_the_file(tmp_path, damage):
    path = tmp_path / f"{damage}.nii.gz"
    if damage == "garbage":
        path.write_bytes(b"this is not a NIfTI file at all" * 10)
    else:
        save_nifti(path, ct_volume())
        raw = gzip.decompress(path.read_bytes())
        path.write_bytes(gzip.compress(raw[: len(raw) // 2])[:-20])
    reader = get_reader(str(path))
    assert reader is not None
    with pytest.raises(VoCoDataError, match=re.escape(path.name)) as info:
        reader(str(path))
    assert info.value.path == path


def test_missing_file_raises_typed_error(tmp_path):
    path = tmp_path / "absent.nii.gz"
    with pytest.raises(VoCoDataError, match=r"absent\.nii\.gz: image file not found"):
        read_volumes(str(path))


# --------------------------------------------------------------------------- writing


def test_image_round_trip_preserves_data_and_affine(tmp_path, affine):
    source = save_nifti(tmp_path / "ct.nii.gz", ct_volume(), affine)
    [(data, kwargs, layer_type)] = read_volumes(str(source))
    assert layer_type == "image"
    out = tmp_path / "out" / "ct_copy.nii.gz"
    assert write_image(str(out), data, kwargs) == [str(out)]
    # written back in the source's storage order with the source's affine, exactly
    written = nib.load(out)
    assert written.get_data_dtype() == np.int16
    np.testing.assert_array_equal(np.asarray(written.dataobj), ct_volume())
    np.testing.assert_array_equal(written.affine, nib.load(source).affine)
    [(again, again_kwargs, again_type)] = read_volumes(str(out))
    assert again_type == "image" and again.dtype == np.int16
    np.testing.assert_array_equal(again, data)
    np.testing.assert_array_equal(again_kwargs["affine"], kwargs["affine"])


def test_labels_round_trip_preserves_data_and_affine(tmp_path, affine):
    source = save_nifti(tmp_path / "organs.nii", label_volume(), affine)
    [(data, kwargs, layer_type)] = read_volumes(str(source))
    assert layer_type == "labels"
    out = tmp_path / "organs_copy.nii"
    assert write_labels(str(out), data.astype(np.int32), kwargs) == [str(out)]
    written = nib.load(out)
    assert written.get_data_dtype() == np.uint8  # int32 layer data: narrowed
    np.testing.assert_array_equal(np.asarray(written.dataobj), label_volume())
    np.testing.assert_array_equal(written.affine, nib.load(source).affine)


@pytest.mark.filterwarnings("ignore:Non-orthogonal slicing")
def test_napari_layers_round_trip_through_their_own_transform(tmp_path, affine):
    """A layer without voco metadata is saved in its own array order with its napari
    data -> world transform taken from the display world (S, P, L) back to RAS; read
    back, every voxel is where it was in napari's world."""
    from napari.layers import Image, Labels

    image_layer = Image(ct_volume().astype(np.float32), affine=affine)
    labels_layer = Labels(label_volume(), affine=affine)
    for layer, writer in ((image_layer, write_image), (labels_layer, write_labels)):
        data, meta, _ = layer.as_layer_data_tuple()
        out = tmp_path / f"{layer.name}.nii.gz"
        writer(str(out), data, meta)
        written = nib.load(out)
        np.testing.assert_array_equal(np.asarray(written.dataobj), layer.data)
        np.testing.assert_allclose(written.affine, DISPLAY_TO_RAS @ affine, atol=1e-5)
        [(again, kwargs, _)] = read_volumes(str(out))
        # the same voxel values at the same napari world positions
        again_layer = (Labels if layer is labels_layer else Image)(again, **{
            k: v for k, v in kwargs.items() if k in ("affine", "metadata")})
        index = np.array([[3, 4, 5], [10, 8, 2], [23, 19, 15]])
        for voxel in index:
            world = layer.data_to_world(voxel)
            again_voxel = np.rint(again_layer.world_to_data(world)).astype(int)
            assert again[tuple(again_voxel)] == layer.data[tuple(voxel)]
            np.testing.assert_allclose(again_layer.data_to_world(again_voxel), world,
                                       atol=1e-3)


def test_affine_from_scale_and_translate():
    from napari.layers import Labels

    layer = Labels(label_volume(), scale=(0.7, 0.8, 3.0), translate=(5.0, -6.0, 7.5))
    expected = np.diag([0.7, 0.8, 3.0, 1.0])
    expected[:3, 3] = [5.0, -6.0, 7.5]
    _, meta, _ = layer.as_layer_data_tuple()
    # napari's world is the display world (S, P, L mm): voxel -> RAS goes through it
    np.testing.assert_allclose(layer_voxel_to_world(meta, SHAPE), DISPLAY_TO_RAS @ expected)
    np.testing.assert_allclose(layer_voxel_to_world({}, SHAPE), DISPLAY_TO_RAS)


def test_source_affine_is_ignored_when_the_shape_changed(rotated_affine):
    meta = {"metadata": {"voco": {"affine": rotated_affine.tolist(), "shape": [4, 4, 4]}},
            "scale": [2.0, 2.0, 2.0]}
    np.testing.assert_allclose(layer_voxel_to_world(meta, SHAPE),
                               DISPLAY_TO_RAS @ np.diag([2.0, 2.0, 2.0, 1.0]))
    np.testing.assert_allclose(layer_voxel_to_world(meta, (4, 4, 4)), rotated_affine)


@pytest.mark.parametrize(
    ("low", "high", "dtype"),
    [(0, 255, np.uint8), (0, 256, np.int16), (-1, 3, np.int16), (0, 70_000, np.int32)],
)
def test_label_storage_dtype_is_the_smallest_that_fits(low, high, dtype):
    assert label_storage_dtype(np.array([low, high], dtype=np.int64)) == dtype


def test_label_storage_dtype_rejects_unstorable_labels():
    with pytest.raises(VoCoDataError, match="32-bit"):
        label_storage_dtype(np.array([0, 2**40], dtype=np.int64))
    with pytest.raises(VoCoDataError, match="whole numbers"):
        label_storage_dtype(np.array([0.0, 1.5]))


def test_image_writer_narrows_int64_and_widens_float16(tmp_path):
    big = tmp_path / "int64.nii.gz"
    write_image(str(big), np.arange(np.prod(SHAPE), dtype=np.int64).reshape(SHAPE), {})
    assert nib.load(big).get_data_dtype() == np.int16
    half = tmp_path / "half.nii.gz"
    write_image(str(half), np.ones(SHAPE, dtype=np.float16), {})
    assert nib.load(half).get_data_dtype() == np.float32


def test_writers_reject_what_nifti_cannot_hold(tmp_path):
    with pytest.raises(VoCoDataError, match="2-D"):
        write_labels(str(tmp_path / "flat.nii.gz"), np.zeros((4, 5), np.uint8), {})
    with pytest.raises(VoCoDataError, match="RGB"):
        write_image(str(tmp_path / "rgb.nii.gz"), np.zeros((4, 5, 3), np.uint8), {"rgb": True})
    with pytest.raises(VoCoDataError, match=r"\*\.nii"):
        write_labels(str(tmp_path / "labels.tif"), label_volume(), {})


def test_multiscale_layers_save_their_full_resolution_level(tmp_path):
    out = tmp_path / "ms.nii.gz"
    levels = [label_volume(), label_volume()[::2, ::2, ::2]]
    write_labels(str(out), levels, {"multiscale": True})
    np.testing.assert_array_equal(np.asarray(nib.load(out).dataobj), label_volume())


# --------------------------------------------------------------------------- sample data


def test_sample_data_is_a_ct_with_overlaying_labels():
    (image, image_kwargs, image_type), (labels, labels_kwargs, labels_type) = (
        make_phantom_sample()
    )
    assert (image_type, labels_type) == ("image", "labels")
    assert image.dtype == np.int16 and labels.dtype == np.uint8
    assert image.shape == labels.shape
    np.testing.assert_array_equal(image_kwargs["affine"], labels_kwargs["affine"])
    assert image_kwargs["contrast_limits"] == CT_WINDOW_HU
    assert labels_kwargs["metadata"]["voco"]["label_names"] == LABEL_NAMES
    assert image_kwargs["metadata"]["voco"]["path"] is None
    assert image_kwargs["metadata"]["voco"]["orientation"] == "RAS"


# --------------------------------------------------------------------------- notifications


@pytest.fixture
def shown(monkeypatch) -> list[str]:
    messages: list[str] = []
    monkeypatch.setattr(_notify, "show_error", messages.append)
    return messages


def test_notify_error_shows_typed_errors_as_their_message(shown, caplog):
    error = VoCoDataError("cannot be read as NIfTI", "/data/broken.nii.gz")
    with caplog.at_level(logging.ERROR, logger="napari_voco._notify"):
        _notify.notify_error(error)
    assert shown == ["/data/broken.nii.gz: cannot be read as NIfTI"]
    assert caplog.records[-1].getMessage() == shown[0]
    assert caplog.records[-1].exc_info is None  # expected error: no traceback


def test_notify_error_prefixes_other_errors_with_their_type(shown, caplog):
    with caplog.at_level(logging.ERROR, logger="napari_voco._notify"):
        try:
            raise KeyError("crop_size")
        except KeyError as err:
            _notify.notify_error(err)
        _notify.notify_error(RuntimeError())
    assert shown == ["KeyError: 'crop_size'", "RuntimeError"]
    assert caplog.records[0].exc_info is not None  # unexpected error: logged with traceback


def test_reporting_errors_catches_and_reports(shown):
    with _notify.reporting_errors():
        raise VoCoConfigError("crop size must be positive")
    assert shown == ["crop size must be positive"]

    @_notify.reporting_errors()
    def callback(value: int) -> int:
        return 10 // value

    assert callback(2) == 5
    assert callback(0) is None
    assert shown[-1] == "ZeroDivisionError: integer division or modulo by zero"
    with pytest.raises(KeyboardInterrupt), _notify.reporting_errors():
        raise KeyboardInterrupt
    assert len(shown) == 2


def test_notify_error_reaches_napari_notification_manager():
    from napari.utils.notifications import notification_manager

    seen = []
    notification_manager.notification_ready.connect(seen.append)
    try:
        _notify.notify_error(VoCoDataError("is 2-D", "flat.nii"))
    finally:
        notification_manager.notification_ready.disconnect(seen.append)
    assert [str(n.message) for n in seen] == ["flat.nii: is 2-D"]


# --------------------------------------------------------------------------- in napari


def world_corners(affine: np.ndarray, shape) -> np.ndarray:
    """World positions (mm) of the centres of the 8 corner voxels, shape (8, 3)."""
    grid = np.array(np.meshgrid(*[[0, n - 1] for n in shape], indexing="ij")).reshape(3, -1).T
    return grid @ affine[:3, :3].T + affine[:3, 3]


@pytest.mark.gui
@pytest.mark.filterwarnings("ignore:Non-orthogonal slicing")
def test_viewer_opens_rotated_nifti_in_world_mm(make_napari_viewer_proxy, tmp_path,
                                                rotated_affine):
    image_path = save_nifti(tmp_path / "ct.nii.gz", ct_volume(), rotated_affine)
    labels_path = save_nifti(tmp_path / "ct_labels.nii.gz", label_volume(), rotated_affine)
    viewer = make_napari_viewer_proxy()
    [image] = viewer.open(image_path, plugin="napari-voco")
    [labels] = viewer.open(labels_path, plugin="napari-voco")
    assert (image._type_string, labels._type_string) == ("image", "labels")
    # napari's world is the display world: RAS mm turned to (S, P, L)
    to_world = RAS_TO_DISPLAY @ rotated_affine[:, [2, 1, 0, 3]]
    for layer in (image, labels):
        np.testing.assert_allclose(layer._data_to_world.affine_matrix, to_world, atol=1e-5)
        # the file's voxel (i, j, k) is layer voxel (k, j, i), at its RAS position
        ras = rotated_affine @ [3.0, 4.0, 5.0, 1.0]
        np.testing.assert_allclose(layer.data_to_world((5, 4, 3)),
                                   (RAS_TO_DISPLAY @ ras)[:3], atol=1e-4)
    # The labels overlay the image: same voxel grid, same voxel -> world map.
    np.testing.assert_allclose(labels._data_to_world.affine_matrix,
                               image._data_to_world.affine_matrix)
    # World extent spans the corner voxels (napari pads half a voxel on each side).
    corners = world_corners(to_world, SHAPE[::-1])
    lower, upper = image.extent.world
    assert np.all(lower <= corners.min(axis=0) + 1e-4)
    assert np.all(upper >= corners.max(axis=0) - 1e-4)
    assert np.all(upper - lower <= corners.max(axis=0) - corners.min(axis=0) + 3.0)
    assert tuple(viewer.dims.axis_labels) == ("S", "P", "L")
    assert viewer.dims.not_displayed == (0,)  # axial slices on the slider
    assert image.contrast_limits == list(CT_WINDOW_HU)

    # Save through napari's writer machinery with this plugin, and read back.
    from napari.plugins.io import save_layers

    out = tmp_path / "saved_labels.nii.gz"
    assert save_layers(str(out), [labels], plugin="napari-voco") == [str(out)]
    written = nib.load(out)  # the source's storage order and affine, exactly
    np.testing.assert_array_equal(np.asarray(written.dataobj), label_volume())
    np.testing.assert_array_equal(written.affine, nib.load(labels_path).affine)


@pytest.mark.gui
def test_viewer_reports_corrupt_file_by_name(make_napari_viewer_proxy, tmp_path):
    path = tmp_path / "broken_scan.nii.gz"
    path.write_bytes(b"\x1f\x8b not really gzip")
    viewer = make_napari_viewer_proxy()
    with pytest.raises(VoCoDataError, match=r"broken_scan\.nii\.gz"):
        viewer.open(path, plugin="napari-voco")
    assert len(viewer.layers) == 0


@pytest.mark.gui
def test_sample_data_opens_in_viewer_within_two_seconds(make_napari_viewer_proxy):
    viewer = make_napari_viewer_proxy()
    start = time.perf_counter()
    layers = viewer.open_sample("napari-voco", "voco_phantom")
    elapsed = time.perf_counter() - start
    assert elapsed < 2.0, f"sample data took {elapsed:.2f} s"
    assert [layer.name for layer in layers] == ["VoCo phantom CT", "VoCo phantom labels"]
    image, labels = layers
    assert labels._type_string == "labels"
    np.testing.assert_allclose(labels._data_to_world.affine_matrix,
                               image._data_to_world.affine_matrix)
    assert labels.data.max() == max(LABEL_NAMES)
    assert image.metadata["voco"]["orientation"] == "RAS"
    # The layers render: the GUI tests' display (Xvfb, Qt xcb, OpenGL) works.
    screenshot = viewer.screenshot(canvas_only=True)
    assert screenshot.ndim == 3 and screenshot.std() > 0
