"""Volume reader and NIfTI writers for napari (npe2 ``readers`` / ``writers`` contributions).

The reader opens what :func:`voco_core.data.read_volume` reads: NIfTI (``.nii``,
``.nii.gz``), NRRD (``.nrrd``, ``.nhdr``), MetaImage (``.mha``, ``.mhd``) and a
folder holding one DICOM series (see :mod:`voco_core.data.readers`).

Geometry
--------
Every volume opens in the *display order* (:data:`DISPLAY_AXES`, ``("S", "P", "L")``),
whatever its storage order on disk (RAS, LPS, S-L-A, small obliquities): the voxel
array is reoriented (flips and axis swaps only, :func:`to_display_order`, nibabel's
``io_orientation`` / ``ornt_transform`` / ``apply_orientation``) so that array axis 0
runs inferior -> superior, axis 1 anterior -> posterior and axis 2 the patient's
right -> left. napari slices axis 0 and shows axes 1 (rows, down) and 2 (columns,
right), so the default 2-D view is an **axial** slice in the radiological convention
of 3D Slicer, ITK-SNAP and OHIF: anterior up, the patient's right on the screen's
left. Radiologists read and paint on these slices.

The napari world is the *display world*: RAS+ millimetres turned by
:data:`RAS_TO_DISPLAY`, ``(x, y, z) -> (z, -y, -x)``, i.e. world axes
``("S", "P", "L")`` in mm (``axis_labels``, ``units="mm"``). Each layer's napari
``affine`` is ``RAS_TO_DISPLAY @ affine_RAS`` (a diagonal scale and shift unless the
file is oblique), so oblique files, labels, boxes and plugin-made layers line up in
one world, and a layer that has no ``metadata["voco"]`` (e.g. napari's *new labels*
layer) still maps to RAS+ through :data:`DISPLAY_TO_RAS`.

Every layer read here carries ``metadata["voco"]``, a dict of plain types:

``affine``
    the layer array's 4 x 4 voxel -> RAS+ mm affine (display order), as nested
    lists of floats: what every :mod:`voco_core` computation on the layer uses;
``path``
    the source file (``str``), or ``None`` for generated data;
``spacing``
    voxel size in mm along the layer array's axes ``(i, j, k)``;
``orientation``
    nibabel's axis code of the file's storage order, e.g. ``"RAS"`` or ``"LPS"``;
``shape``
    the layer array's shape ``(I, J, K)`` the affine belongs to;
``storage`` (layers made from a volume)
    how to put the layer back into the file's storage order: ``ornt`` (nibabel
    orientation transform display -> storage, ``[[axis, flip], ...]``), ``affine``
    and ``shape`` of the stored volume and its ``dtype``;
``label_names`` (label maps, when known)
    ``{value: name}``, also set as the layer's ``features`` (napari then shows
    the class name under the cursor).

Image or labels
---------------
A file becomes a **Labels** layer when :func:`voco_core.data.looks_like_labels`
says it is a label map (the one rule, also ``voco info``'s: the NIfTI intent or a
label-like file or folder name with label values, else unambiguous data: booleans,
or non-negative integers with few distinct values); everything else is an
**Image** (8-bit MRI, integer CT in Hounsfield units, floating-point data).

Images whose values span :data:`CT_WINDOW_HU` (minimum <= -175 and maximum >=
250, as any CT in Hounsfield units does) open with that soft-tissue window as
contrast limits; other images use napari's default (the data range).

Writers
-------
:func:`write_image` and :func:`write_labels` save one layer as ``.nii.gz`` or
``.nii``. A layer from this reader (still of its shape) is written back exactly
as stored: the display-order array turned back by ``storage["ornt"]``, with the
file's affine (and, for labels, its integer type). Any other layer is written in
its own array order with the voxel -> RAS+ affine of :func:`layer_voxel_to_world`.
Label maps are otherwise stored with the smallest integer type that holds them
(see :func:`label_storage_dtype`).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from nibabel.orientations import (
    aff2axcodes,
    apply_orientation,
    axcodes2ornt,
    inv_ornt_aff,
    io_orientation,
    ornt_transform,
)

from voco_core.data import looks_like_labels
from voco_core.data.io import VolumeRecord, read_volume, write_volume
from voco_core.data.readers.sources import is_volume_file_path, looks_like_dicom_folder
from voco_core.errors import VoCoDataError

# (data, layer keyword arguments, layer type name): what npe2 readers return.
LayerDataTuple = tuple[np.ndarray, dict[str, Any], str]
ReaderFunction = Callable[[str | Sequence[str]], list[LayerDataTuple]]

CT_WINDOW_HU = (-175.0, 250.0)
"""Contrast limits (Hounsfield units) for images whose values span this range."""

DISPLAY_AXES = ("S", "P", "L")
"""Where the layer array's axes (and napari's world axes) run: axis 0 to Superior,
axis 1 to Posterior (rows grow downward: anterior is up), axis 2 to the patient's
Left (columns grow rightward: the patient's right is on the screen's left)."""

WORLD_AXIS_LABELS = DISPLAY_AXES
WORLD_UNITS = "mm"

RAS_TO_DISPLAY = np.array([[0.0, 0.0, 1.0, 0.0],
                           [0.0, -1.0, 0.0, 0.0],
                           [-1.0, 0.0, 0.0, 0.0],
                           [0.0, 0.0, 0.0, 1.0]])
"""RAS+ mm ``(x, y, z)`` -> display world mm ``(S, P, L) = (z, -y, -x)``, 4 x 4."""

DISPLAY_TO_RAS = RAS_TO_DISPLAY.T.copy()
"""Display world mm -> RAS+ mm (the inverse of a signed permutation is its transpose)."""

_DISPLAY_ORNT = axcodes2ornt(DISPLAY_AXES)


# --------------------------------------------------------------------------- orientation


def _inverse_ornt(ornt: np.ndarray) -> np.ndarray:
    """The nibabel orientation transform undoing ``ornt`` (axis ``i`` went to ``ornt[i, 0]``
    with flip ``ornt[i, 1]``, so axis ``ornt[i, 0]`` comes back to ``i``, same flip)."""
    inverse = np.empty_like(ornt)
    for axis, (target, flip) in enumerate(np.asarray(ornt)):
        inverse[int(target)] = (axis, flip)
    return inverse


def to_display_order(array: np.ndarray, affine: np.ndarray
                     ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(array, affine, ornt)``: a volume in storage order turned into the display order
    :data:`DISPLAY_AXES` (module doc).

    Args:
        array: ``(I, J, K)`` or channels-last ``(I, J, K, C)`` voxels in storage order.
        affine: ``(4, 4)`` storage voxel -> RAS+ mm.

    Returns:
        the reoriented array (a view: only flips and axis swaps, voxel values and
        spacing untouched), its own voxel -> RAS+ mm affine (``affine`` composed with
        the voxel permutation, so every voxel keeps its RAS position), and the
        ``(3, 2)`` nibabel orientation transform taking the display array back to
        storage order (``apply_orientation(display, ornt)`` is the stored array).
        Each voxel axis goes to the anatomical axis nearest to it (nibabel's
        ``io_orientation``), so a slightly oblique file keeps its small rotation in
        the affine. An affine whose axes nibabel cannot assign (e.g. a zero column)
        keeps the storage order.
    """
    affine = np.asarray(affine, dtype=np.float64)
    storage = io_orientation(affine)
    if not np.isfinite(storage).all():
        return array, affine, np.array([[0.0, 1.0], [1.0, 1.0], [2.0, 1.0]])
    to_display = ornt_transform(storage, _DISPLAY_ORNT)
    display = apply_orientation(array, to_display)
    display_affine = affine @ inv_ornt_aff(to_display, array.shape[:3])
    return display, display_affine, _inverse_ornt(to_display)


def display_affine(affine: np.ndarray) -> np.ndarray:
    """The napari ``affine`` of a layer whose voxel -> RAS+ mm affine is ``affine``:
    ``RAS_TO_DISPLAY @ affine`` (voxel -> display world mm)."""
    return RAS_TO_DISPLAY @ np.asarray(affine, dtype=np.float64)


# --------------------------------------------------------------------------- reading


def _as_path_list(path: Any) -> list[str] | None:
    """``path`` as a list of strings, or None when it is neither a path nor a list of paths."""
    if isinstance(path, str | Path):
        return [str(path)]
    if isinstance(path, list | tuple) and path and all(isinstance(p, str | Path) for p in path):
        return [str(p) for p in path]
    return None


def get_reader(path: str | Sequence[str]) -> ReaderFunction | None:
    """npe2 reader hook: :func:`read_volumes` when every path is a volume file (NIfTI,
    NRRD, MetaImage) or a folder holding DICOM files, else None.

    ``path`` is one path or a list of paths. Returns None (never raises) for a
    folder without DICOM files (a look at its first files,
    :func:`~voco_core.data.readers.sources.looks_like_dicom_folder`), a name not ending in
    a volume suffix, or a list with any such entry. Whether the file or series can
    actually be read is checked by :func:`read_volumes`.
    """
    try:
        paths = _as_path_list(path)
        if paths is None:
            return None
        for candidate in paths:
            folder = Path(candidate).is_dir()
            if folder and (is_volume_file_path(candidate)
                           or not looks_like_dicom_folder(Path(candidate))):
                return None
            if not folder and not is_volume_file_path(candidate):
                return None
    except Exception:  # an odd path (e.g. not decodable) is simply not ours
        return None
    return read_volumes


def read_volumes(path: str | Sequence[str]) -> list[LayerDataTuple]:
    """Read one volume (NIfTI, NRRD or MetaImage file, or DICOM series folder) or a list
    of them: one layer per volume, in order.

    Each file becomes an ``"image"`` or ``"labels"`` layer (rule in the module doc)
    in the display order (axial slices on the slider), with the napari ``affine``
    into the display world, ``axis_labels=("S", "P", "L")``, ``units="mm"`` and
    ``metadata["voco"]``. Raises :class:`VoCoDataError` naming the file for a
    missing, corrupt, truncated or non-3-D file.
    """
    paths = _as_path_list(path)
    if paths is None:
        raise VoCoDataError(f"expected a volume path or a list of paths, got {path!r}")
    layers = []
    for file in paths:
        record = read_volume(file)
        as_labels, _reason = looks_like_labels(record)
        label_names = _decathlon_label_names(record.path) if as_labels else None
        layers.append(volume_layer_data(record, as_labels=as_labels, label_names=label_names))
    return layers


def volume_metadata(
    record: VolumeRecord, label_names: Mapping[int, str] | None = None,
    storage: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The ``metadata["voco"]`` dict (keys in the module doc) of a layer whose data is
    ``record.array`` as is (``affine``, ``shape``, ``spacing`` describe that array).

    ``storage``: the ``storage`` entry, when the array is the display-order view of a
    stored volume (:func:`volume_layer_data`); ``orientation`` is then the stored
    volume's axis code."""
    affine = np.asarray(record.affine, dtype=np.float64)
    meta: dict[str, Any] = {
        "affine": affine.tolist(),
        "path": str(record.path) if record.path is not None else None,
        "spacing": [float(s) for s in np.linalg.norm(affine[:3, :3], axis=0)],
        "orientation": record.orientation,
        "shape": list(record.shape),
    }
    if storage is not None:
        meta["storage"] = {key: (value.tolist() if isinstance(value, np.ndarray) else value)
                           for key, value in storage.items()}
        meta["orientation"] = "".join(aff2axcodes(np.asarray(storage["affine"])))
    if label_names is not None:
        meta["label_names"] = {int(k): str(v) for k, v in label_names.items()}
    return meta


def derived_metadata(source: Mapping[str, Any] | None, record: VolumeRecord,
                     label_names: Mapping[int, str] | None = None) -> dict[str, Any]:
    """``metadata["voco"]`` of a layer the plugin makes on the voxel grid of a layer whose
    metadata is ``source`` (e.g. a segmentation of an image): :func:`volume_metadata`
    of ``record`` (the new layer's array, with the source layer's voxel -> RAS+
    affine, ``path`` None), plus the source layer's ``storage`` and ``orientation``
    (without its ``dtype``) when both grids agree, so that the new layer is written
    back in the source file's storage order and affine too."""
    meta = volume_metadata(record, label_names)
    voco = (source or {}).get("voco") or {}
    storage = voco.get("storage")
    same_grid = (storage is not None and voco.get("affine") is not None
                 and list(voco.get("shape", [])) == list(record.shape)
                 and np.allclose(voco["affine"], record.affine, atol=1e-6))
    if same_grid:
        meta["storage"] = {key: value for key, value in storage.items() if key != "dtype"}
        meta["orientation"] = voco.get("orientation", meta["orientation"])
    return meta


def volume_layer_data(
    record: VolumeRecord,
    *,
    as_labels: bool | None = None,
    name: str | None = None,
    label_names: Mapping[int, str] | None = None,
) -> LayerDataTuple:
    """A napari LayerData tuple ``(data, kwargs, layer_type)`` showing ``record`` in the
    display order and display world (module doc).

    Args:
        record: the volume in storage order; the layer gets a view of its array in
            display order (no copy) unless it must become integer for a Labels layer.
        as_labels: force a ``"labels"`` (True) or ``"image"`` (False) layer;
            default: :func:`voco_core.data.looks_like_labels`.
        name: layer name; default ``record.name``.
        label_names: ``{value: class name}`` for a label map, stored in the
            metadata and as the layer's ``features``.
    """
    if as_labels is None:
        as_labels, _reason = looks_like_labels(record)
    data, affine, to_storage = to_display_order(record.array, record.affine)
    shown = VolumeRecord(data, affine, record.spacing, record.path)
    storage = {"ornt": to_storage, "affine": np.asarray(record.affine, dtype=np.float64),
               "shape": list(record.shape), "dtype": str(record.array.dtype)}
    kwargs: dict[str, Any] = {
        "name": name if name is not None else record.name,
        "affine": display_affine(affine),
        "axis_labels": WORLD_AXIS_LABELS,
        "units": WORLD_UNITS,
        "metadata": {"voco": volume_metadata(shown, label_names if as_labels else None,
                                             storage)},
    }
    if as_labels:
        if not np.issubdtype(data.dtype, np.integer):
            data = data.astype(label_storage_dtype(data))
        if label_names:
            values = sorted(int(v) for v in label_names)
            kwargs["features"] = {
                "index": np.asarray(values),
                "name": np.asarray([str(label_names[v]) for v in values]),
            }
        return data, kwargs, "labels"
    if record.channels > 1:
        return _channel_layers_data(shown, kwargs)
    if data.size and data.min() <= CT_WINDOW_HU[0] and data.max() >= CT_WINDOW_HU[1]:
        kwargs["contrast_limits"] = CT_WINDOW_HU
    return data, kwargs, "image"


def _channel_layers_data(record: VolumeRecord, kwargs: dict[str, Any]) -> LayerDataTuple:
    """One image LayerData tuple for a channels-last ``(I, J, K, C)`` record, opened
    with napari's ``channel_axis``: one layer per channel, each with the record's
    geometry and ``metadata["voco"]`` plus ``channel`` (index) and ``channels``
    (count), by which the widgets put the image back together
    (:func:`napari_voco._layers.layer_to_record`). Contrast limits per channel: the CT
    window when the channel spans it, else its own range."""
    count = record.channels
    limits = []
    for c in range(count):
        low, high = float(record.array[..., c].min()), float(record.array[..., c].max())
        spans_ct = low <= CT_WINDOW_HU[0] and high >= CT_WINDOW_HU[1]
        limits.append(CT_WINDOW_HU if spans_ct else (low, high if high > low else low + 1.0))
    base = kwargs["metadata"]["voco"]
    kwargs.update(
        channel_axis=3,
        name=[f"{kwargs['name']} [channel {c + 1}]" for c in range(count)],
        # one full 3-axis entry per channel: napari hands a list of C entries out one
        # per channel (a bare list of C unit names would reach every channel whole)
        axis_labels=[WORLD_AXIS_LABELS] * count,
        units=[(WORLD_UNITS,) * 3] * count,
        metadata=[{"voco": {**base, "channel": c, "channels": count}} for c in range(count)],
        contrast_limits=limits,
    )
    return record.array, kwargs, "image"


def _decathlon_label_names(path: Path | None) -> dict[int, str] | None:
    """Class names for a label map in a Decathlon / nnU-Net folder (``labelsTr/x.nii.gz``
    beside a ``dataset.json``), or None. Both ``{"1": "liver"}`` (Decathlon) and
    ``{"liver": 1}`` (nnU-Net v2) layouts are understood; anything else is ignored."""
    if path is None or not path.parent.name.lower().startswith("labels"):
        return None
    spec_file = path.parent.parent / "dataset.json"
    try:
        labels = json.loads(spec_file.read_text()).get("labels")
    except (OSError, UnicodeDecodeError, ValueError, AttributeError):
        return None
    if not isinstance(labels, dict) or not labels:
        return None
    try:
        if all(str(key).lstrip("-").isdigit() for key in labels):
            return {int(key): str(name) for key, name in labels.items()}
        if all(isinstance(value, int) for value in labels.values()):
            return {int(value): str(name) for name, value in labels.items()}
    except (TypeError, ValueError):
        return None
    return None


# --------------------------------------------------------------------------- writing


def layer_data_to_display(meta: Mapping[str, Any], ndim: int) -> np.ndarray:
    """A layer's ``(D+1, D+1)`` data -> napari world matrix as napari applies it,
    ``affine @ (rotate @ shear @ diag(scale) + translate)``, from the ``affine``,
    ``rotate``, ``shear``, ``scale`` and ``translate`` entries of ``meta`` (a layer
    with only scale ``s`` and translate ``t`` gives ``diag(s)`` with ``t`` as the last
    column; none gives the identity)."""
    from napari.utils.transforms import CompositeAffine

    data_to_physical = CompositeAffine(
        scale=meta.get("scale", np.ones(ndim)),
        translate=meta.get("translate", np.zeros(ndim)),
        rotate=meta.get("rotate"),
        shear=meta.get("shear"),
        ndim=ndim,
    ).affine_matrix
    physical_to_world = meta.get("affine")
    if physical_to_world is None:
        physical_to_world = np.eye(ndim + 1)
    physical_to_world = np.asarray(getattr(physical_to_world, "affine_matrix", physical_to_world))
    return physical_to_world @ data_to_physical


def layer_voxel_to_world(meta: Mapping[str, Any], shape: Sequence[int]) -> np.ndarray:
    """The 4 x 4 voxel -> RAS+ mm affine of a layer's data array: the one layer -> file
    geometry rule of the plugin (training data, segmentation, positions, writers).

    Uses ``meta["metadata"]["voco"]["affine"]`` (set by the reader: the display-order
    array's own RAS+ affine) when it is there and belongs to an array of this
    ``shape``; otherwise the layer's napari transform
    (:func:`layer_data_to_display`) taken from the display world back to RAS+,
    ``DISPLAY_TO_RAS @ data_to_display``: whatever lines up with the reader's layers
    in napari lines up with them in RAS+ too (e.g. napari's *new labels* layer, which
    copies the image's transform but not its metadata).

    Args:
        meta: the layer's keyword-argument dict (``layer.as_layer_data_tuple()[1]``).
        shape: the data shape, ``(I, J, K)``.
    """
    shape = tuple(int(s) for s in shape)
    source = (meta.get("metadata") or {}).get("voco") or {}
    if source.get("affine") is not None and tuple(source.get("shape", shape)) == shape:
        affine = np.asarray(source["affine"], dtype=np.float64)
        if affine.shape == (4, 4) and np.isfinite(affine).all():
            return affine
    to_display = layer_data_to_display(meta, len(shape))
    return DISPLAY_TO_RAS @ to_display if len(shape) == 3 else to_display


def storage_volume(array: np.ndarray, affine: np.ndarray, meta: Mapping[str, Any]
                   ) -> tuple[np.ndarray, np.ndarray, np.dtype | None]:
    """``(array, affine, dtype)`` to write a layer with: for a layer from the reader (its
    ``metadata["voco"]["storage"]``, still of the reader's shape) the stored volume
    exactly, i.e. the display-order ``array`` turned back to the file's storage order,
    the file's affine and stored type (``dtype``, None when unknown); for any other
    layer ``(array, affine, None)`` unchanged."""
    voco = (meta.get("metadata") or {}).get("voco") or {}
    storage = voco.get("storage")
    if not storage or list(voco.get("shape", [])) != list(array.shape):
        return array, affine, None
    stored = apply_orientation(array, np.asarray(storage["ornt"], dtype=np.float64))
    if list(stored.shape) != list(storage["shape"]):  # a hand-edited entry: keep display
        return array, affine, None
    dtype = storage.get("dtype")
    return stored, np.asarray(storage["affine"], dtype=np.float64), (
        np.dtype(dtype) if dtype else None)


def _integer_dtype_for_range(low: int, high: int) -> np.dtype | None:
    for dtype in (np.uint8, np.int16, np.int32):
        info = np.iinfo(dtype)
        if info.min <= low and high <= info.max:
            return np.dtype(dtype)
    return None


def label_storage_dtype(data: np.ndarray) -> np.dtype:
    """Integer type a label map is saved with: ``uint8`` when all values are in
    0..255, else ``int16``, else ``int32``. Raises :class:`VoCoDataError` for
    values outside the ``int32`` range or non-integer values."""
    if data.size == 0:
        return np.dtype(np.uint8)
    low, high = data.min(), data.max()
    if not np.issubdtype(data.dtype, np.integer) and data.dtype != np.bool_:
        if not np.isfinite([low, high]).all() or not np.array_equal(data, np.rint(data)):
            raise VoCoDataError(f"label values must be whole numbers, got {data.dtype} data")
    dtype = _integer_dtype_for_range(int(low), int(high))
    if dtype is None:
        raise VoCoDataError(
            f"label values {int(low)}..{int(high)} do not fit a 32-bit integer NIfTI label map"
        )
    return dtype


def storage_array(array: np.ndarray, labels: bool = False) -> np.ndarray:
    """``array`` in a type NIfTI stores, the one rule for every volume the plugin writes
    (writers and training data): labels as :func:`label_storage_dtype`; images keep
    their type except 64-bit integers (narrowed to the smallest integer type that
    holds them, else float64) and float16 (widened to float32)."""
    if labels:
        return array.astype(label_storage_dtype(array), copy=False)
    if array.dtype in (np.int64, np.uint64):
        low_high = (int(array.min()), int(array.max())) if array.size else (0, 0)
        dtype = _integer_dtype_for_range(*low_high)
        return array.astype(dtype if dtype is not None else np.float64)
    if array.dtype == np.float16:
        return array.astype(np.float32)
    return array


def layer_data_volume(data: Any, meta: Mapping[str, Any], kind: str = "image",
                      name: str | None = None, path: str | Path | None = None
                      ) -> tuple[np.ndarray, np.ndarray]:
    """``(array, affine)`` of a single-channel 3-D layer given as napari hands it to
    writers (``data`` and the ``meta`` keyword dict): the full-resolution level as a
    numpy array in the layer's own (display) order, unchanged, and its voxel -> RAS+
    affine (:func:`layer_voxel_to_world`). The one layer -> volume rule of the plugin:
    the writers use it, and so do the widgets, through
    :func:`napari_voco._layers.layer_volume` (a layer object: its data and transform,
    :func:`napari_voco._layers.layer_meta`). A label painted on the axial slice ``k`` of
    the slider is ``array[k]``, whose voxels share one RAS+ ``z``.

    Raises :class:`VoCoDataError` naming the layer (``name``) or the file (``path``)
    for an RGB or non-3-D layer."""
    what = f"layer {name!r}" if name is not None else f"the {kind} layer"
    if meta.get("multiscale"):
        data = data[0]
    if meta.get("rgb"):
        raise VoCoDataError(f"{what} is an RGB image: expected a 3-D {kind} layer "
                            "(one channel)", path)
    array = np.asarray(data)
    if array.ndim != 3:
        raise VoCoDataError(f"{what} is {array.ndim}-D with shape {array.shape}: expected "
                            f"a 3-D {kind} layer", path)
    return array, layer_voxel_to_world(meta, array.shape)


def write_image(path: str, data: Any, meta: dict[str, Any]) -> list[str]:
    """npe2 single-layer writer: save an Image layer as NIfTI (``.nii.gz`` or ``.nii``).

    A layer from the reader is written in the file's storage order with the file's
    affine (:func:`storage_volume`), any other with :func:`layer_voxel_to_world`. The
    voxel values keep their type (64-bit integers are narrowed, float16 is widened).
    Returns ``[path]``. Raises :class:`VoCoDataError` for a non-3-D or RGB layer or an
    unwritable path.
    """
    array, affine = layer_data_volume(data, meta, "image", path=path)
    array, affine, _dtype = storage_volume(array, affine, meta)
    return [str(write_volume(path, storage_array(array), affine=affine))]


def write_labels(path: str, data: Any, meta: dict[str, Any]) -> list[str]:
    """npe2 single-layer writer: save a Labels layer as a NIfTI label map.

    Geometry as :func:`write_image`. Values keep the file's integer type when the layer
    came from the reader and still holds that type, else they are stored as
    :func:`label_storage_dtype` (``uint8`` / ``int16`` / ``int32``). Returns
    ``[path]``. Raises :class:`VoCoDataError` for a non-3-D layer, labels outside the
    ``int32`` range or an unwritable path.
    """
    array, affine = layer_data_volume(data, meta, "labels", path=path)
    array, affine, dtype = storage_volume(array, affine, meta)
    # the source's own integer type (at most 32 bits, as NIfTI label maps go) round-trips
    # exactly; anything else is narrowed to the smallest type that holds the values
    keep = (dtype is not None and array.dtype == dtype
            and np.issubdtype(dtype, np.integer) and dtype.itemsize <= 4)
    stored = array if keep else storage_array(array, labels=True)
    return [str(write_volume(path, stored, affine=affine))]
