"""Standard orientation, same world (issue 28 §1): whatever the storage order on disk, the
napari reader shows axial slices on the slider in the radiological convention (anterior
up, the patient's right on the screen's left) in one world in mm, writes a layer back
exactly as it was stored, and a label painted on an axial slice trains on that slice.

The volumes are a CT phantom (it knows its anatomy: liver on the patient's right,
spleen on the left, spine posterior, lungs above the kidneys) and an MRI-like head
made here, each stored as RAS, LPS and S-L-A (same physical content, different
storage order and affine; the storage is built with numpy alone, not with the
nibabel functions the reader uses).
"""

from __future__ import annotations

from types import SimpleNamespace

import nibabel as nib
import numpy as np
import pytest

pytest.importorskip("napari")

from napari_voco._io import (
    DISPLAY_TO_RAS,
    RAS_TO_DISPLAY,
    get_reader,
    write_image,
    write_labels,
)
from voco_core.data.io import read_volume
from voco_core.data.phantoms import LABELS, make_phantom

from conftest import save_nifti

# storage name -> (new axis n holds old RAS axis perm[n], flip of each old RAS axis)
STORAGES = {
    "RAS": ((0, 1, 2), (False, False, False)),
    "LPS": ((0, 1, 2), (True, True, False)),
    "SLA": ((2, 0, 1), (True, False, False)),
}
CODES = {"RAS": ("R", "A", "S"), "LPS": ("L", "P", "S"), "SLA": ("S", "L", "A")}

HEAD = {"brain": 1, "eye_right": 2, "lesion_right": 3, "eye_left": 4}


def store(array: np.ndarray, affine: np.ndarray, storage: str
          ) -> tuple[np.ndarray, np.ndarray]:
    """``(array, affine)`` of a RAS-stored volume stored another way, same physical content:
    voxel ``v`` of the result is RAS voxel ``u`` with ``u[perm[n]] = v[n]`` (or
    ``N - 1 - v[n]`` for a flipped axis), and the affine maps it to the same mm."""
    perm, flips = STORAGES[storage]
    flipped = array
    for axis, flip in enumerate(flips):
        if flip:
            flipped = np.flip(flipped, axis)
    stored = np.ascontiguousarray(flipped.transpose(perm))
    new_to_old = np.zeros((4, 4))
    new_to_old[3, 3] = 1.0
    for new, old in enumerate(perm):
        new_to_old[old, new] = -1.0 if flips[old] else 1.0
        new_to_old[old, 3] = array.shape[old] - 1 if flips[old] else 0.0
    return stored, affine @ new_to_old


def make_head() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(mri, labels, affine)``: an MRI-like head in RAS storage, float32 grey values and
    a uint8 label map (:data:`HEAD`): brain, two eyes in front and below, a bright
    lesion in the right hemisphere. 1.2 x 1.1 x 1.4 mm voxels."""
    shape, spacing = (40, 44, 36), np.array([1.2, 1.1, 1.4])
    affine = np.diag([*spacing, 1.0])
    affine[:3, 3] = -(np.array(shape) - 1) / 2 * spacing + [2.0, -3.0, 10.0]
    i, j, k = np.meshgrid(*[np.arange(n) for n in shape], indexing="ij")
    x, y, z = (affine[a, 0] * i + affine[a, 1] * j + affine[a, 2] * k + affine[a, 3]
               for a in range(3))
    x, y, z = x - 2.0, y + 3.0, z - 10.0  # head frame centred in the volume

    def ball(cx, cy, cz, rx, ry, rz):
        return ((x - cx) / rx) ** 2 + ((y - cy) / ry) ** 2 + ((z - cz) / rz) ** 2 <= 1.0

    labels = np.zeros(shape, dtype=np.uint8)
    mri = np.zeros(shape, dtype=np.float32)
    mri[ball(0, 0, 0, 22, 23, 24)] = 70.0  # scalp
    mri[ball(0, 0, 0, 20, 21, 22)] = 15.0  # skull
    brain = ball(0, -2, 4, 17, 18, 17)
    labels[brain], mri[brain] = HEAD["brain"], 120.0
    for name, side in (("eye_right", 8.0), ("eye_left", -8.0)):
        eye = ball(side, 17.0, -9.0, 3.5, 3.5, 3.5)
        labels[eye], mri[eye] = HEAD[name], 160.0
    lesion = ball(9.0, -4.0, 7.0, 4.0, 4.0, 4.0)
    labels[lesion], mri[lesion] = HEAD["lesion_right"], 220.0
    mri += np.random.default_rng(0).normal(0.0, 4.0, shape).astype(np.float32)
    return mri, labels, affine


@pytest.fixture(scope="module")
def volumes():
    """name -> (image RAS, labels RAS, affine RAS, anatomy checks)."""
    phantom = make_phantom(0, 0, (48, 48, 32))
    head = make_head()
    return {"phantom": (phantom.image, phantom.label, phantom.affine),
            "head": head}


@pytest.fixture(scope="module")
def stored_files(volumes, tmp_path_factory):
    """(volume, storage) -> (image path, labels path), written with plain nibabel."""
    folder = tmp_path_factory.mktemp("orientation")
    files = {}
    for volume, (image, labels, affine) in volumes.items():
        for storage in STORAGES:
            image_s, affine_s = store(image, affine, storage)
            labels_s, _ = store(labels, affine, storage)
            assert nib.aff2axcodes(affine_s) == CODES[storage]
            files[volume, storage] = (
                save_nifti(folder / f"{volume}_{storage}.nii.gz", image_s, affine_s),
                save_nifti(folder / f"{volume}_{storage}_labels.nii.gz", labels_s, affine_s))
    return files


def read(path):
    """Open ``path`` through the npe2 reader hook, as napari does: one layer tuple."""
    reader = get_reader(str(path))
    assert reader is not None
    [layer] = reader(str(path))
    return layer


def centroid(labels: np.ndarray, values) -> np.ndarray:
    """Mean voxel index ``(3,)`` of the voxels holding any of ``values``."""
    return np.argwhere(np.isin(labels, values)).mean(axis=0)


def to_world(affine: np.ndarray, voxel: np.ndarray) -> np.ndarray:
    return (np.asarray(affine) @ [*voxel, 1.0])[:3]


# --------------------------------------------------------------------------- display


@pytest.mark.parametrize("storage", list(STORAGES))
def test_phantom_opens_axial_anterior_up_right_on_the_left(stored_files, volumes, storage):
    image_path, labels_path = stored_files["phantom", storage]
    image, image_kwargs, image_type = read(image_path)
    labels, kwargs, labels_type = read(labels_path)
    assert (image_type, labels_type) == ("image", "labels")
    assert kwargs["axis_labels"] == ("S", "P", "L") and kwargs["units"] == "mm"
    assert labels.shape == image.shape == (32, 48, 48)  # axial slices on the slider (Z)

    liver, spleen = centroid(labels, LABELS["liver"]), centroid(labels, LABELS["spleen"])
    kidney_r = centroid(labels, LABELS["kidney_right"])
    kidney_l = centroid(labels, LABELS["kidney_left"])
    spine, body = centroid(labels, LABELS["spine"]), centroid(labels, list(range(1, 11)))
    lungs, kidneys = centroid(labels, LABELS["lungs"]), centroid(labels, [7, 8])
    # columns: the patient's right (liver, right kidney) on the screen's left
    assert liver[2] < spleen[2] and kidney_r[2] < kidney_l[2]
    # rows: posterior (spine) at the bottom, i.e. anterior up
    assert spine[1] > body[1] + 5
    # slider: superior (lungs) at higher slice indices than the kidneys
    assert lungs[0] > kidneys[0] + 3

    # the same in world mm: napari's world axes are (S, P, L); back to RAS they are the
    # phantom's own RAS positions of these organs
    affine = kwargs["affine"]
    np.testing.assert_array_equal(affine, image_kwargs["affine"])
    assert to_world(affine, liver)[2] < to_world(affine, spleen)[2]
    assert to_world(affine, spine)[1] > to_world(affine, body)[1]
    assert to_world(affine, lungs)[0] > to_world(affine, kidneys)[0]
    _, ras_labels, ras_affine = volumes["phantom"]
    for organ in ("liver", "spleen", "spine", "lungs"):
        shown = to_world(affine, centroid(labels, LABELS[organ]))
        truth = to_world(ras_affine, centroid(ras_labels, LABELS[organ]))
        # NIfTI stores the affine in float32: agreement to a micrometre
        np.testing.assert_allclose((DISPLAY_TO_RAS @ [*shown, 1.0])[:3], truth, atol=1e-4)
    liver_ras = to_world(ras_affine, centroid(ras_labels, LABELS["liver"]))
    assert liver_ras[0] > to_world(ras_affine, centroid(ras_labels, LABELS["spleen"]))[0]


@pytest.mark.parametrize("storage", list(STORAGES))
def test_head_opens_axial_anterior_up_right_on_the_left(stored_files, storage):
    image_path, labels_path = stored_files["head", storage]
    mri, _, image_type = read(image_path)
    labels, kwargs, labels_type = read(labels_path)
    assert (image_type, labels_type) == ("image", "labels")
    assert mri.dtype == np.float32 and mri.shape == labels.shape == (36, 44, 40)
    brain = centroid(labels, HEAD["brain"])
    eye_r, eye_l = centroid(labels, HEAD["eye_right"]), centroid(labels, HEAD["eye_left"])
    lesion = centroid(labels, HEAD["lesion_right"])
    eyes = (eye_r + eye_l) / 2
    assert eyes[1] < brain[1] - 10  # eyes in front: anterior up
    assert eye_r[2] < eye_l[2] and lesion[2] < brain[2]  # the patient's right on the left
    assert eyes[0] < brain[0]  # eyes below the brain's centre: superior = higher slice
    # the brightest voxels (lesion) sit where the labels say: image and labels overlay
    assert np.all(labels[mri > 200] == HEAD["lesion_right"])
    affine = kwargs["affine"]
    assert to_world(affine, eye_r)[2] < to_world(affine, eye_l)[2]
    assert to_world(affine, eyes)[1] < to_world(affine, brain)[1]


@pytest.mark.parametrize("volume", ["phantom", "head"])
def test_every_storage_order_shows_the_same_array_in_the_same_world(stored_files, volume):
    shown = {storage: (read(stored_files[volume, storage][0]),
                       read(stored_files[volume, storage][1])) for storage in STORAGES}
    (ras_image, ras_kwargs, _), (ras_labels, _, _) = shown["RAS"]
    for storage, ((image, kwargs, _), (labels, labels_kwargs, _)) in shown.items():
        np.testing.assert_array_equal(image, ras_image, err_msg=storage)
        np.testing.assert_array_equal(labels, ras_labels, err_msg=storage)
        # same voxel -> napari world and voxel -> RAS maps, so the same anatomical
        # point (the same display voxel) has the same world coordinates (to a
        # micrometre: each file stores its own affine in float32)
        np.testing.assert_allclose(kwargs["affine"], ras_kwargs["affine"], atol=1e-4)
        np.testing.assert_array_equal(labels_kwargs["affine"], kwargs["affine"])
        np.testing.assert_allclose(kwargs["metadata"]["voco"]["affine"],
                                   ras_kwargs["metadata"]["voco"]["affine"], atol=1e-4)
        assert kwargs["metadata"]["voco"]["orientation"] == "".join(CODES[storage])
        # a diagonal napari affine: axial slices are not resampled
        linear = np.asarray(kwargs["affine"])[:3, :3]
        np.testing.assert_array_equal(linear, np.diag(np.diag(linear)))
        assert np.all(np.diag(linear) > 0)


def test_oblique_file_opens_axial_with_its_tilt_in_the_affine(volumes, tmp_path):
    """A slightly oblique LPS file: the nearest axes go to S, P, L; the small rotation
    stays in the (exact) affine; the write back is exact."""
    _, labels, affine = volumes["phantom"]
    labels_s, affine_s = store(labels, affine, "LPS")
    angle = np.deg2rad(7.0)
    tilt = np.eye(4)
    tilt[1:3, 1:3] = [[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]]
    source = save_nifti(tmp_path / "oblique_labels.nii.gz", labels_s, tilt @ affine_s)
    data, kwargs, _ = read(source)
    assert data.shape == (32, 48, 48)
    assert centroid(data, LABELS["liver"])[2] < centroid(data, LABELS["spleen"])[2]
    assert centroid(data, LABELS["spine"])[1] > centroid(data, list(range(1, 11)))[1]
    voco = kwargs["metadata"]["voco"]
    np.testing.assert_allclose(kwargs["affine"], RAS_TO_DISPLAY @ voco["affine"])
    # every voxel keeps its RAS position: the display voxel of a source voxel
    source_affine = nib.load(source).affine
    value_voxel = np.argwhere(labels_s == LABELS["aorta"])[0]
    ras = to_world(source_affine, value_voxel)
    shown_voxel = np.rint(np.linalg.solve(np.asarray(voco["affine"]), [*ras, 1.0])[:3])
    assert data[tuple(shown_voxel.astype(int))] == LABELS["aorta"]
    out = tmp_path / "oblique_copy.nii.gz"
    write_labels(str(out), data, kwargs)
    written = nib.load(out)
    assert np.asarray(written.dataobj).tobytes() == labels_s.tobytes()
    np.testing.assert_array_equal(written.affine, source_affine)


# --------------------------------------------------------------------------- writing


@pytest.mark.parametrize("storage", list(STORAGES))
@pytest.mark.parametrize("volume", ["phantom", "head"])
def test_read_write_round_trip_is_the_source_exactly(stored_files, tmp_path, volume,
                                                     storage):
    from napari.layers import Image, Labels

    for path, writer, layer_class in zip(stored_files[volume, storage],
                                         (write_image, write_labels), (Image, Labels),
                                         strict=True):
        source = nib.load(path)
        data, kwargs, _ = read(path)
        # as napari hands a layer to the writer: the layer's own data and keywords
        layer = layer_class(data, **kwargs)
        layer_data, meta, _ = layer.as_layer_data_tuple()
        for how, (array, keywords) in {"tuple": (data, kwargs),
                                       "layer": (layer_data, meta)}.items():
            out = tmp_path / f"{path.name[:-7]}_{how}.nii.gz"
            assert writer(str(out), array, keywords) == [str(out)]
            written = nib.load(out)
            expected = np.asarray(source.dataobj)
            assert written.get_data_dtype() == source.get_data_dtype(), (path, how)
            assert written.shape == source.shape
            assert np.asarray(written.dataobj).tobytes() == expected.tobytes(), (path, how)
            np.testing.assert_array_equal(written.affine, source.affine)


def test_segmentation_layer_writes_back_in_the_image_storage_order(stored_files, tmp_path):
    """A Labels layer the plugin makes on an image's grid (a segmentation) carries the
    image's storage entry: saved, it lies on the source file's grid and order."""
    from napari.components import ViewerModel

    from napari_voco._layers import layer_to_record, show_segmentation

    image_path, labels_path = stored_files["phantom", "SLA"]
    viewer = ViewerModel()
    data, kwargs, _ = read(image_path)
    image = viewer.add_image(data, **kwargs)
    truth, _, _ = read(labels_path)
    record = layer_to_record(image)
    result = SimpleNamespace(labels=np.asarray(truth).copy(),
                             class_names=[f"class {v}" for v in range(11)])
    segmentation = show_segmentation(viewer, image, record, result)
    out = tmp_path / "segmentation.nii.gz"
    write_labels(str(out), segmentation.data, segmentation.as_layer_data_tuple()[1])
    written, source = nib.load(out), nib.load(labels_path)
    np.testing.assert_array_equal(np.asarray(written.dataobj), np.asarray(source.dataobj))
    np.testing.assert_array_equal(written.affine, source.affine)


# --------------------------------------------------------------------------- painting


@pytest.mark.parametrize("storage", list(STORAGES))
def test_label_painted_on_an_axial_slice_trains_on_that_slice(stored_files, tmp_path,
                                                              storage):
    """Paint on slice k of napari's *new labels* layer (the image's transform, no voco
    metadata); the plugin's layer -> volume path and the training data written from it
    put the label on voxels whose RAS z is that slice's."""
    from napari.components import ViewerModel

    from napari_voco._layers import layer_volume, write_training_volume
    from napari_voco._sparse import ignore_value, slicing_axis, sparse_labels

    viewer = ViewerModel()
    data, kwargs, _ = read(stored_files["phantom", storage][0])
    image = viewer.add_image(data, **kwargs)
    viewer.layers.selection.active = image
    viewer._new_labels()  # napari's "new labels" button
    painted = viewer.layers[-1]
    assert "voco" not in (painted.metadata or {})
    k = 20
    viewer.dims.set_point(0, image.data_to_world((k, 0, 0))[0])
    assert viewer.dims.not_displayed == (0,)
    painted.brush_size = 6
    painted.paint((k, 24, 14), 5)  # on the shown axial slice, the patient's right side
    painted.paint((k, 20, 30), 6)
    assert set(np.unique(np.nonzero(painted.data)[0])) == {k}

    slice_z = image.data_to_world((k, 0, 0))[0]  # world S of slice k = RAS z
    array, affine = layer_volume(painted, "labels")
    image_array, image_affine = layer_volume(image)
    np.testing.assert_allclose(affine, image_affine, atol=1e-9)  # a training pair
    assert array.shape == image_array.shape
    voxels = np.argwhere(array > 0)
    ras = voxels @ affine[:3, :3].T + affine[:3, 3]
    np.testing.assert_allclose(ras[:, 2], slice_z, atol=1e-6)
    assert np.ptp(ras[:, 0]) > 5 and np.ptp(ras[:, 1]) > 5  # an in-plane patch
    # x of the patient's-right paint (label 5) > x of the left one (label 6): RAS x
    assert ras[array[tuple(voxels.T)] == 5, 0].mean() > ras[array[tuple(voxels.T)] == 6, 0].mean()

    # "annotated slices only" along the axis napari slices, then the volume written for
    # voco_core: the painted slice is there, whole, at that z; the rest is ignored
    axis = slicing_axis(viewer, painted)
    assert axis == 0
    ignore = ignore_value(int(array.max()))
    sparse, count = sparse_labels(painted.name, array, axis, ignore)
    assert count == 1
    path = write_training_volume(tmp_path / "labelsTr" / f"{storage}.nii.gz", sparse, affine,
                                 labels=True)
    record = read_volume(path)
    annotated = np.argwhere(record.array != ignore)
    z = annotated @ record.affine[2, :3] + record.affine[2, 3]
    np.testing.assert_allclose(z, slice_z, atol=1e-4)
    assert len(annotated) == data.shape[1] * data.shape[2]
    on_slice = np.argwhere((record.array > 0) & (record.array != ignore))
    np.testing.assert_allclose(on_slice @ record.affine[2, :3] + record.affine[2, 3],
                               slice_z, atol=1e-4)
    assert len(on_slice) == len(voxels)


# --------------------------------------------------------------------------- in napari


@pytest.mark.gui
def test_viewer_shows_an_axial_slice_with_anterior_up(make_napari_viewer_proxy,
                                                     stored_files):
    viewer = make_napari_viewer_proxy()
    [image] = viewer.open(str(stored_files["phantom", "LPS"][0]), plugin="napari-voco")
    [labels] = viewer.open(str(stored_files["phantom", "LPS"][1]), plugin="napari-voco")
    assert viewer.dims.not_displayed == (0,) and viewer.dims.displayed == (1, 2)
    assert tuple(viewer.dims.axis_labels) == ("S", "P", "L")
    assert tuple(viewer.scene.camera.orientation2d) == ("down", "right")  # rows down, columns right
    shown = labels._slice.image.raw  # the 2-D slice napari draws
    liver = np.argwhere(shown == LABELS["liver"]).mean(axis=0)
    spleen = np.argwhere(shown == LABELS["spleen"]).mean(axis=0)
    spine = np.argwhere(shown == LABELS["spine"]).mean(axis=0)
    body = np.argwhere(shown > 0).mean(axis=0)
    assert liver[1] < spleen[1] and spine[0] > body[0]
    np.testing.assert_allclose(labels._data_to_world.affine_matrix,
                               image._data_to_world.affine_matrix)
