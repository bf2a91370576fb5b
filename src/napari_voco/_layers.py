"""Small helpers shared by the plugin's widgets: layers <-> :mod:`voco_core` objects.

Coordinates
-----------
An image layer's *data coordinates* are its voxel indices with voxel ``i``'s
centre at ``i`` (napari's convention). voco_core's image boxes are continuous
intervals ``[low, high)`` in which voxel ``i`` occupies ``[i, i + 1)`` (see
:mod:`voco_core.inference`), so a box's rectangle in data coordinates runs from
``low - 0.5`` to ``high - 0.5``. Every layer the widgets derive from an image
(grid, boxes, crops, labels) gets the image layer's own transform (``affine``,
``scale``, ``translate``, ``rotate``, ``shear``, units and axis labels), so
shapes drawn in the image's data coordinates overlay it in the world.

3-D boxes as napari rectangles
------------------------------
A napari rectangle lies in one plane. VoCo's base crops and sub-volumes are
full-depth boxes whose extent matters only in the x-y plane of the
pre-processed sample; pre-processing only permutes, flips, scales and shifts the
voxel axes, so the sample's x and y run along two image axes ``a`` and ``b``
(:func:`plane_axes`) and its z along the third, ``c``. Each box is drawn as a
rectangle spanning its extent on ``a`` and ``b``, placed on one slice of ``c``
(the slice being viewed; the widgets move it with the slider).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from napari_voco._io import (
    derived_metadata,
    layer_data_to_display,
    layer_data_volume,
    storage_array,
)
from voco_core.data.io import VolumeRecord, write_volume
from voco_core.errors import VoCoDataError

if TYPE_CHECKING:
    import napari
    from napari.layers import Layer


def unwrap(obj: Any) -> Any:
    """The napari object behind a ``PublicOnlyProxy`` (what npe2 hands plugin widgets),
    so that identity and ``id()`` are stable; anything else unchanged."""
    return getattr(obj, "__wrapped__", obj)


# --------------------------------------------------------------------------- geometry


def layer_meta(layer: Layer) -> dict[str, Any]:
    """The parts of a layer's keyword dict (``layer.as_layer_data_tuple()[1]``) that place
    its data: transform, ``metadata``, ``multiscale``, ``rgb``; without copying data."""
    return {
        "metadata": layer.metadata,
        "scale": np.asarray(layer.scale, dtype=np.float64),
        "translate": np.asarray(layer.translate, dtype=np.float64),
        "rotate": np.asarray(layer.rotate, dtype=np.float64),
        "shear": np.asarray(layer.shear, dtype=np.float64),
        "affine": np.asarray(layer.affine.affine_matrix, dtype=np.float64),
        "multiscale": bool(getattr(layer, "multiscale", False)),
        "rgb": bool(getattr(layer, "rgb", False)),
    }


def layer_data_to_world(layer: Layer) -> np.ndarray:
    """The layer's ``(D+1, D+1)`` data -> napari world matrix as napari applies it:
    ``affine @ (rotate @ shear @ diag(scale) + translate)``. The napari world is the
    display world (``S, P, L`` mm, see :mod:`napari_voco._io`): use it for what the
    screen shows; :func:`layer_volume` gives the voxel -> RAS+ affine."""
    return layer_data_to_display(layer_meta(layer), layer.ndim)


def layer_volume(layer: Layer, kind: str = "image") -> tuple[np.ndarray, np.ndarray]:
    """``(array, affine)`` of a single-channel 3-D layer: its full-resolution data in the
    layer's own (display) order and its voxel -> RAS+ affine: ``metadata["voco"]``
    (layers from this plugin's reader) or else its napari transform taken back from
    the display world to RAS+ (see :func:`napari_voco._io.layer_data_volume`, the one
    rule). :class:`VoCoDataError` names the layer otherwise, also for one channel of a
    multi-channel file: training from layers takes single-channel images (the widgets
    write them as 3-D NIfTI)."""
    channel, channels, path = channel_of(layer)
    if channels > 1:
        raise VoCoDataError(
            f"layer {layer.name!r} is channel {channel + 1} of {channels} of {path}: training "
            "from layers takes single-channel images; train on the multi-channel file "
            "itself (a data folder or datalist)")
    return layer_data_volume(layer.data, layer_meta(layer), kind,
                             name=getattr(layer, "name", "?"))


def channel_of(layer: Layer) -> tuple[int, int, str | None]:
    """``(channel index, channel count, source path)`` of a layer the reader made from
    one channel of a multi-channel file (``metadata["voco"]["channel"]``,
    ``["channels"]``); ``(0, 1, path)`` for any other layer."""
    meta = ((getattr(layer, "metadata", None) or {}).get("voco") or {})
    return int(meta.get("channel", 0)), int(meta.get("channels", 1)), meta.get("path")


def layer_to_record(layer: Any, viewer: napari.Viewer | None = None) -> VolumeRecord:
    """A :class:`VolumeRecord` of a 3-D image layer (:func:`layer_volume`; the path from
    ``metadata["voco"]`` when the layer came from a file). :class:`VoCoDataError` for
    anything but a 3-D image layer.

    A layer that is one channel of a multi-channel file (the reader opens those with
    napari's ``channel_axis``, one layer per channel) stands for the whole image: its
    sibling layers in ``viewer`` (same file, same channel count) are stacked channels
    last, ``(I, J, K, C)``; a missing channel layer is an error naming it."""
    from napari.layers import Image

    if layer is None:
        raise VoCoDataError("no image layer chosen: open a 3-D image first")
    if not isinstance(layer, Image):
        raise VoCoDataError(f"layer {layer.name!r} is a {type(layer).__name__} layer: "
                            "expected a 3-D image layer")
    channel, channels, path = channel_of(layer)
    if channels == 1:
        array, affine = layer_volume(layer)
    else:
        siblings: dict[int, Any] = {}
        for other in (viewer.layers if viewer is not None else [layer]):
            other = unwrap(other)
            index, count, source = channel_of(other)
            if isinstance(other, Image) and count == channels and source == path:
                siblings.setdefault(index, other)
        siblings[channel] = unwrap(layer)
        missing = [c + 1 for c in range(channels) if c not in siblings]
        if missing:
            raise VoCoDataError(f"layer {layer.name!r} is channel {channel + 1} of {channels} "
                                f"of {path}, but channel {missing[0]} is not in the viewer: "
                                "open the file again")
        volumes = [layer_data_volume(siblings[c].data, layer_meta(siblings[c]), "image",
                                     name=siblings[c].name) for c in range(channels)]
        affine = volumes[0][1]
        if any(v[0].shape != volumes[0][0].shape for v in volumes):
            raise VoCoDataError(f"the channel layers of {path} differ in shape: "
                                f"{[v[0].shape for v in volumes]}")
        array = np.stack([v[0] for v in volumes], axis=-1)
    spacing = tuple(float(s) for s in np.linalg.norm(affine[:3, :3], axis=0))
    return VolumeRecord(array, affine, spacing, Path(path) if path else None)  # type: ignore[arg-type]


def transform_kwargs(layer: Layer) -> dict[str, Any]:
    """Keyword arguments giving a new layer the transform (and units, axis labels) of
    ``layer``, so both share data coordinates."""
    return {
        "scale": np.array(layer.scale, dtype=np.float64),
        "translate": np.array(layer.translate, dtype=np.float64),
        "rotate": np.array(layer.rotate, dtype=np.float64),
        "shear": np.array(layer.shear, dtype=np.float64),
        "affine": np.array(layer.affine.affine_matrix, dtype=np.float64),
        "units": tuple(layer.units),
        "axis_labels": tuple(layer.axis_labels),
    }


def copy_transform(target: Layer, source: Layer) -> None:
    """Give the existing layer ``target`` the transform of ``source``."""
    for key, value in transform_kwargs(source).items():
        setattr(target, key, value)


def plane_axes(sample_to_image: np.ndarray) -> tuple[int, int, int]:
    """Image axes ``(a, b, c)`` along which the sample's x, y and z run.

    ``sample_to_image`` is a signed, scaled permutation (pre-processing reorients,
    resizes, crops); each sample axis maps to the image axis of its column's
    largest entry."""
    linear = np.abs(np.asarray(sample_to_image, dtype=np.float64)[:3, :3])
    a, b, c = (int(np.argmax(linear[:, axis])) for axis in range(3))
    if len({a, b, c}) != 3:  # an oblique mapping: fall back to the largest entries
        order = np.argsort(-linear, axis=None)
        used_rows: list[int] = []
        used_cols: list[int] = []
        pick = [0, 0, 0]
        for flat in order:
            row, col = divmod(int(flat), 3)
            if row not in used_rows and col not in used_cols:
                pick[col] = row
                used_rows.append(row)
                used_cols.append(col)
        a, b, c = pick
    return a, b, c


def box_rectangles(boxes: np.ndarray, axes: tuple[int, int, int],
                   slice_index: float) -> list[np.ndarray]:
    """Image boxes ``(m, 3, 2)`` -> ``m`` napari rectangles ``(4, 3)`` in the image's data
    coordinates: the extent on axes ``a, b`` (``low - 0.5 .. high - 0.5``), at
    ``slice_index`` on axis ``c``."""
    a, b, c = axes
    rectangles = []
    for box in np.asarray(boxes, dtype=np.float64).reshape(-1, 3, 2):
        (a0, a1), (b0, b1) = box[a] - 0.5, box[b] - 0.5
        rect = np.zeros((4, 3))
        rect[:, a] = (a0, a0, a1, a1)
        rect[:, b] = (b0, b1, b1, b0)
        rect[:, c] = slice_index
        rectangles.append(rect)
    return rectangles


def rectangle_to_box(vertices: np.ndarray, axes: tuple[int, int, int],
                     image_shape: Sequence[int]) -> np.ndarray:
    """A shape's vertices (image data coordinates) -> an image box ``(3, 2)``: the
    bounding box on axes ``a, b`` and the whole extent of axis ``c``.

    Raises :class:`VoCoDataError` when the shape is not 3-D or is flat along ``a`` or
    ``b`` (drawn in another plane)."""
    vertices = np.asarray(vertices, dtype=np.float64)
    if vertices.ndim != 2 or vertices.shape[1] != 3:
        raise VoCoDataError(f"the sub-volume shape has {vertices.shape[-1]}-D vertices: "
                            "expected a rectangle on the 3-D image")
    a, b, c = axes
    box = np.empty((3, 2))
    for axis in (a, b):
        low, high = vertices[:, axis].min() + 0.5, vertices[:, axis].max() + 0.5
        if high - low < 1.0:
            raise VoCoDataError(
                f"the sub-volume box is flat along image axis {axis}: draw it in the plane "
                f"of image axes {a} and {b} (the sample's x-y plane)")
        box[axis] = (low, high)
    box[c] = (0.0, float(image_shape[c]))
    return box


def crop_data_to_world(image_data_to_world: np.ndarray, sample_to_image: np.ndarray,
                       sample_box: np.ndarray, size: int) -> np.ndarray:
    """``(4, 4)`` data -> world matrix of a network-input crop ``(S, S, S)`` cut from the
    integer sample box ``(3, 2)`` and resized to ``S = size``.

    Resizing with ``align_corners=False`` maps crop voxel ``u`` to sample coordinate
    ``low - 0.5 + (u + 0.5) * L / S`` (``L`` the box length) along each axis."""
    box = np.asarray(sample_box, dtype=np.float64)
    length = box[:, 1] - box[:, 0]
    step = length / float(size)
    crop_to_sample = np.eye(4)
    crop_to_sample[:3, :3] = np.diag(step)
    crop_to_sample[:3, 3] = box[:, 0] - 0.5 + 0.5 * step
    return (np.asarray(image_data_to_world, dtype=np.float64)
            @ np.asarray(sample_to_image, dtype=np.float64) @ crop_to_sample)


def current_slice(viewer: napari.Viewer, layer: Layer, axis: int) -> int:
    """The index along the layer's data ``axis`` of the slice the viewer shows (clipped)."""
    try:
        position = np.asarray(layer.world_to_data(viewer.dims.point), dtype=np.float64)
        value = position[axis]
    except (IndexError, ValueError, TypeError):
        value = np.nan
    size = int(np.asarray(layer.data[0] if getattr(layer, "multiscale", False)
                          else layer.data).shape[axis])
    if not np.isfinite(value):
        return size // 2
    return int(np.clip(np.rint(value), 0, size - 1))


def show_plane(viewer: napari.Viewer, layer: Layer, axes: tuple[int, int]) -> None:
    """In 2-D view, turn the viewer so that the layer's data axes ``axes`` (rows, columns)
    are the displayed ones (only when they are not already)."""
    if viewer.dims.ndisplay != 2:
        return
    offset = viewer.dims.ndim - layer.ndim
    wanted = [offset + axes[0], offset + axes[1]]
    if sorted(viewer.dims.displayed) == sorted(wanted):
        return
    order = [axis for axis in viewer.dims.order if axis not in wanted] + wanted
    viewer.dims.order = tuple(order)


# --------------------------------------------------------------------------- layers -> files


def safe_file_stem(name: str, taken: set[str]) -> str:
    """A file-name stem from a layer name (letters, digits, ``._-``), unique in ``taken``
    (which it is added to)."""
    stem = re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._") or "layer"
    candidate, index = stem, 1
    while candidate.lower() in taken:
        index += 1
        candidate = f"{stem}_{index}"
    taken.add(candidate.lower())
    return candidate


def write_training_volume(path: Path, array: np.ndarray, affine: np.ndarray,
                          labels: bool = False) -> Path:
    """Write a layer's volume as NIfTI for training, stored as the writers store it
    (:func:`napari_voco._io.storage_array`). An unwritable folder is a
    :class:`VoCoDataError`."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise VoCoDataError(f"output folder is not writable ({err.strerror or err})",
                            path.parent) from err
    return write_volume(path, storage_array(array, labels=labels), affine=affine)


# --------------------------------------------------------------------------- results -> layers


def show_segmentation(viewer: napari.Viewer, image: Layer, record: VolumeRecord,
                      result: Any) -> Layer:
    """Show a :class:`~voco_core.inference.SegmentationResult` of ``image`` as the Labels
    layer ``"<image> segmentation"`` with the image's transform (the label map is on the
    image's voxel grid), class names in ``features`` (napari shows the class under the
    cursor) and ``metadata["voco"]`` with ``label_names`` (the NIfTI writer keeps them)
    and the image's ``storage`` (:func:`napari_voco._io.derived_metadata`). An
    existing layer of that name and shape is updated in place. Returns the layer."""
    from napari.layers import Labels

    names = list(result.class_names)
    labels_record = VolumeRecord(result.labels, record.affine, record.spacing, None)
    # the image's storage entry too: saving the segmentation writes it in the image
    # file's storage order and affine, so it overlays the source file outside napari
    metadata = {"voco": derived_metadata(image.metadata, labels_record, dict(enumerate(names)))}
    features = {"index": np.arange(len(names)), "name": np.asarray(names, dtype=object)}
    name = f"{image.name} segmentation"
    existing = next((unwrap(layer) for layer in viewer.layers
                     if layer.name == name and isinstance(layer, Labels)
                     and layer.data.shape == result.labels.shape), None)
    if existing is None:
        return unwrap(viewer.add_labels(result.labels, name=name, features=features,
                                        metadata=metadata, **transform_kwargs(image)))
    copy_transform(existing, image)
    existing.data = result.labels
    existing.features = features
    existing.metadata = metadata
    return existing
