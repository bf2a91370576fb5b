"""Volume reader and NIfTI writers for napari (npe2 ``readers`` / ``writers`` contributions).

The reader opens what :func:`voco_core.data.read_volume` reads: NIfTI (``.nii``,
``.nii.gz``), NRRD (``.nrrd``, ``.nhdr``), MetaImage (``.mha``, ``.mhd``) and a
folder holding one DICOM series (see :mod:`voco_core.data.formats`).

Geometry
--------
A layer holds the voxel array exactly in the file's storage order (no
reorientation, see :mod:`voco_core.data.io`) and gets the file's 4 x 4 affine as
its napari ``affine``, so the napari world frame is the NIfTI world frame:
RAS+ millimetres, axis 0 = x (to the patient's Right), axis 1 = y (Anterior),
axis 2 = z (Superior). Rotated, oblique or non-RAS (e.g. LPS) files therefore
line up in world space with each other, and a label map overlays the image it
was drawn on. Layers get ``axis_labels=("x", "y", "z")`` and ``units="mm"``.

Every layer read here carries ``metadata["voco"]``, a dict of plain types:

``affine``
    the file's 4 x 4 voxel -> world (RAS+ mm) affine, as nested lists of floats;
``path``
    the source file (``str``), or ``None`` for generated data;
``spacing``
    voxel size in mm along the array axes ``(i, j, k)``;
``orientation``
    nibabel's axis code, e.g. ``"RAS"`` or ``"LPS"``;
``shape``
    the array shape ``(I, J, K)`` the affine belongs to;
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
``.nii`` with the geometry of :func:`layer_voxel_to_world`: the source file's
affine when the layer came from this reader, else the layer's own napari
transform. Label maps are stored with the smallest integer type that holds
them (see :func:`label_storage_dtype`).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from voco_core.data import looks_like_labels
from voco_core.data.formats import is_volume_file_path, looks_like_dicom_folder
from voco_core.data.io import VolumeRecord, read_volume, write_volume
from voco_core.errors import VoCoDataError

# (data, layer keyword arguments, layer type name): what npe2 readers return.
LayerDataTuple = tuple[np.ndarray, dict[str, Any], str]
ReaderFunction = Callable[[str | Sequence[str]], list[LayerDataTuple]]

CT_WINDOW_HU = (-175.0, 250.0)
"""Contrast limits (Hounsfield units) for images whose values span this range."""

WORLD_AXIS_LABELS = ("x", "y", "z")
WORLD_UNITS = "mm"


# --------------------------------------------------------------------------- reading


def _as_path_list(path: Any) -> list[str] | None:
    """``path`` as a list of strings, or None when it is neither a path nor a list of paths."""
    if isinstance(path, str | Path):
        return [str(path)]
    if isinstance(path, list | tuple) and path and all(isinstance(p, str | Path) for p in path):
        return [str(p) for p in path]
    return None


def get_reader(path: str | Sequence[str]) -> ReaderFunction | None:
    """npe2 reader hook: :func:`read_nifti` when every path is a volume file (NIfTI,
    NRRD, MetaImage) or a folder holding DICOM files, else None.

    ``path`` is one path or a list of paths. Returns None (never raises) for a
    folder without DICOM files (a look at its first files,
    :func:`~voco_core.data.formats.looks_like_dicom_folder`), a name not ending in
    a volume suffix, or a list with any such entry. Whether the file or series can
    actually be read is checked by :func:`read_nifti`.
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
    return read_nifti


def read_nifti(path: str | Sequence[str]) -> list[LayerDataTuple]:
    """Read one volume (NIfTI, NRRD or MetaImage file, or DICOM series folder) or a list
    of them: one layer per volume, in order.

    Each file becomes an ``"image"`` or ``"labels"`` layer (rule in the module doc)
    with the file's affine, ``axis_labels=("x", "y", "z")``, ``units="mm"`` and
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
    record: VolumeRecord, label_names: Mapping[int, str] | None = None
) -> dict[str, Any]:
    """The ``metadata["voco"]`` dict of a layer made from ``record`` (keys in the module doc)."""
    meta: dict[str, Any] = {
        "affine": np.asarray(record.affine, dtype=np.float64).tolist(),
        "path": str(record.path) if record.path is not None else None,
        "spacing": [float(s) for s in record.spacing],
        "orientation": record.orientation,
        "shape": list(record.shape),
    }
    if label_names is not None:
        meta["label_names"] = {int(k): str(v) for k, v in label_names.items()}
    return meta


def volume_layer_data(
    record: VolumeRecord,
    *,
    as_labels: bool | None = None,
    name: str | None = None,
    label_names: Mapping[int, str] | None = None,
) -> LayerDataTuple:
    """A napari LayerData tuple ``(data, kwargs, layer_type)`` showing ``record`` in world mm.

    Args:
        record: the volume; its array is used as is (no copy) unless it must
            become integer for a Labels layer.
        as_labels: force a ``"labels"`` (True) or ``"image"`` (False) layer;
            default: :func:`voco_core.data.looks_like_labels`.
        name: layer name; default ``record.name``.
        label_names: ``{value: class name}`` for a label map, stored in the
            metadata and as the layer's ``features``.
    """
    if as_labels is None:
        as_labels, _reason = looks_like_labels(record)
    kwargs: dict[str, Any] = {
        "name": name if name is not None else record.name,
        "affine": np.asarray(record.affine, dtype=np.float64),
        "axis_labels": WORLD_AXIS_LABELS,
        "units": WORLD_UNITS,
        "metadata": {"voco": volume_metadata(record, label_names if as_labels else None)},
    }
    data = record.array
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
        return _channel_layers_data(record, kwargs)
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


def layer_voxel_to_world(meta: Mapping[str, Any], shape: Sequence[int]) -> np.ndarray:
    """The 4 x 4 voxel -> world (RAS+ mm) affine to save a layer with.

    Uses ``meta["metadata"]["voco"]["affine"]`` (the source file's affine) when it
    is there and belongs to an array of this ``shape``; otherwise composes the
    layer's napari transform, ``affine @ (rotate @ shear @ diag(scale) + translate)``,
    from the ``affine``, ``rotate``, ``shear``, ``scale`` and ``translate`` entries
    of ``meta`` (a layer with only scale ``s`` and translate ``t`` gives
    ``diag(s)`` with ``t`` as the last column).

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

    from napari.utils.transforms import CompositeAffine

    ndim = len(shape)
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


def layer_volume(data: Any, meta: Mapping[str, Any], kind: str = "image",
                 name: str | None = None, path: str | Path | None = None
                 ) -> tuple[np.ndarray, np.ndarray]:
    """``(array, affine)`` of a single-channel 3-D layer given as napari hands it to
    writers (``data`` and the ``meta`` keyword dict): the full-resolution level as a
    numpy array, unchanged, and the voxel -> world affine of
    :func:`layer_voxel_to_world`. The one layer -> volume helper of the plugin (the
    widgets pass a layer's data and transform, see :func:`napari_voco._layers.layer_meta`).

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

    The voxel values keep their type (64-bit integers are narrowed, float16 is
    widened); the geometry is :func:`layer_voxel_to_world`. Returns ``[path]``.
    Raises :class:`VoCoDataError` for a non-3-D or RGB layer or an unwritable path.
    """
    array, affine = layer_volume(data, meta, "image", path=path)
    return [str(write_volume(path, storage_array(array), affine=affine))]


def write_labels(path: str, data: Any, meta: dict[str, Any]) -> list[str]:
    """npe2 single-layer writer: save a Labels layer as a NIfTI label map.

    Values are stored as :func:`label_storage_dtype` (``uint8`` / ``int16`` /
    ``int32``), the geometry is :func:`layer_voxel_to_world`. Returns ``[path]``.
    Raises :class:`VoCoDataError` for a non-3-D layer, labels outside the
    ``int32`` range or an unwritable path.
    """
    array, affine = layer_volume(data, meta, "labels", path=path)
    return [str(write_volume(path, storage_array(array, labels=True), affine=affine))]
