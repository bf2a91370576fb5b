"""NIfTI reading/writing and datalists (checks before a read: :mod:`voco_core.data.files`).

Axis convention
---------------
A :class:`VolumeRecord` keeps the voxel array exactly in the file's storage
order: ``array[i, j, k]`` is voxel ``(i, j, k)`` and ``affine @ (i, j, k, 1)`` is
its centre in world millimetres, RAS+ (x to the patient's Right, y Anterior,
z Superior), as nibabel defines it. Nothing is reoriented on read, so writing a
result back with the source affine overlays exactly. ``spacing`` is the voxel
size in mm along ``i, j, k``; ``orientation`` is nibabel's axis code (e.g.
``"RAS"`` or ``"LPS"``) saying which world direction each voxel axis points to.

Datalists
---------
:func:`load_datalist` accepts a Decathlon-style JSON (``{"training": [{"image":
..., "label": ...}]}``, paths relative to the JSON's folder) or a folder. A
folder is read as: its ``dataset.json`` if it has one; else ``imagesTr/`` (with
labels paired by file name from ``labelsTr/`` when that exists); else every
``.nii``/``.nii.gz`` file directly inside it, sorted by name.
:func:`read_dataset_json` and :func:`dataset_class_names` read the Decathlon JSON's
other fields (``validation``, the ``labels`` names).

Image or label map
------------------
:func:`looks_like_labels` (from :mod:`voco_core.data.labelmaps`) decides whether a
volume is a label map or an intensity image; the napari reader and ``voco info``
both use it.

Every problem raises :class:`~voco_core.errors.VoCoDataError` naming the file.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import nibabel as nib
import numpy as np

from voco_core.data.files import (
    READ_ERRORS,
    is_nifti_path,
    nifti_suffix,
    open_nifti,
    require_file,
)
from voco_core.data.labelmaps import looks_like_labels
from voco_core.errors import VoCoDataError

RAS_LABELS = (("L", "R"), ("P", "A"), ("I", "S"))
"""MONAI ``Orientation`` axis labels for nibabel's convention (what a
:class:`VolumeRecord`'s affine means): axis codes point to R, A, S."""


@dataclass(frozen=True, eq=False)
class VolumeRecord:
    """One 3-D volume and its geometry.

    Attributes:
        array: voxel data, shape ``(I, J, K)`` in file storage order (see module doc).
        affine: ``(4, 4)`` float64, voxel index -> world RAS+ position in mm.
        spacing: voxel size in mm along ``(i, j, k)``.
        path: the file it was read from, if any; its name is part of the
            image-or-label-map decision (:func:`looks_like_labels`).
        header: the NIfTI header it was read with, reused when writing results;
            its intent code is the other part of that decision.
    """

    array: np.ndarray
    affine: np.ndarray
    spacing: tuple[float, float, float]
    path: Path | None = None
    header: nib.Nifti1Header | None = field(default=None, repr=False)

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(int(s) for s in self.array.shape)  # type: ignore[return-value]

    @property
    def orientation(self) -> str:
        """nibabel axis code of the voxel axes, e.g. ``"RAS"``."""
        return "".join(nib.aff2axcodes(self.affine))

    @property
    def is_label_map(self) -> bool:
        """True for integer or boolean data, the dtypes a label map can have. Integer
        CT and 8-bit MRI have them too: whether a volume *is* a label map is
        :func:`looks_like_labels`."""
        return bool(np.issubdtype(self.array.dtype, np.integer) or self.array.dtype == np.bool_)

    @property
    def intent(self) -> str:
        """The header's NIfTI intent, e.g. ``"label"``, ``"neuroname"`` or ``"none"``
        (also ``"none"`` without a header)."""
        if self.header is None:
            return "none"
        try:
            return str(self.header.get_intent()[0])
        except (KeyError, ValueError):  # a code nibabel does not know
            return f"code {int(self.header['intent_code'])}"

    @property
    def name(self) -> str:
        """File name without the NIfTI suffix (``"case_001"`` for ``case_001.nii.gz``)."""
        if self.path is None:
            return "volume"
        return self.path.name[: -len(nifti_suffix(self.path))]

    def describe(self) -> dict:
        """Plain-type summary (what ``voco info`` prints)."""
        data = self.array
        summary = {
            "file": str(self.path) if self.path else None,
            "shape": list(self.shape),
            "dtype": str(data.dtype),
            "spacing_mm": [round(s, 4) for s in self.spacing],
            "extent_mm": [round(s * n, 1) for s, n in zip(self.spacing, self.shape, strict=True)],
            "orientation": self.orientation,
            "intensity_min": float(data.min()),
            "intensity_max": float(data.max()),
            "intensity_mean": float(data.mean(dtype=np.float64)),
        }
        as_labels, reason = looks_like_labels(self)
        summary["kind"] = "label map" if as_labels else "image"
        summary["kind_reason"] = reason
        if as_labels:
            values, counts = np.unique(data, return_counts=True)
            if values.size <= 64:
                pairs = zip(values.tolist(), counts.tolist(), strict=True)
                summary["label_voxels"] = {int(v): int(c) for v, c in pairs}
        return summary


def check_volume_header(
    path: str | Path, *, kind: str = "image", min_shape: Sequence[int] | None = None
) -> tuple[int, int, int]:
    """Cheap pre-flight check from the header alone (no voxel data is read): the file
    exists, is NIfTI, is 3-D (or 4-D with one channel) and, when ``min_shape`` is
    given, is at least that large. Returns the shape; raises :class:`VoCoDataError`."""
    path = Path(path)
    _, shape = open_nifti(path, kind)
    if min_shape is not None:
        _require_min_shape(shape, min_shape, path)
    return shape  # type: ignore[return-value]


def read_volume(
    path: str | Path,
    *,
    kind: str = "image",
    min_shape: Sequence[int] | None = None,
) -> VolumeRecord:
    """Read a 3-D NIfTI volume (``.nii`` or ``.nii.gz``).

    Args:
        path: the file.
        kind: ``"image"`` or ``"label map"``; only used in error messages.
        min_shape: when given, the volume must be at least this large along
            each voxel axis (e.g. the crop size), else :class:`VoCoDataError`.

    A 4-D file is accepted when its extra axes have length 1 (one channel).
    Raises :class:`VoCoDataError` for a missing file, a non-NIfTI file, a
    truncated or corrupt file, data that is not 3-D, and non-finite voxels.
    """
    path = Path(path)
    image, shape = open_nifti(path, kind)
    try:
        array = np.asanyarray(image.dataobj).reshape(shape)
    except READ_ERRORS as err:
        raise VoCoDataError(
            f"data cannot be read: the file is truncated or corrupt ({type(err).__name__}: {err})",
            path,
        ) from err
    if np.issubdtype(array.dtype, np.floating) or np.issubdtype(array.dtype, np.complexfloating):
        finite = np.isfinite(array)
        if not finite.all():
            bad = int(finite.size - np.count_nonzero(finite))
            what = "all voxels are NaN/inf" if bad == finite.size else f"{bad} voxels are NaN/inf"
            raise VoCoDataError(f"{what}; expected finite {kind} values", path)

    spacing = tuple(float(z) for z in image.header.get_zooms()[:3])
    if any(not np.isfinite(s) or s <= 0 for s in spacing):
        raise VoCoDataError(f"voxel spacing {spacing} mm is not positive", path)
    record = VolumeRecord(
        array=array,
        affine=np.asarray(image.affine, dtype=np.float64),
        spacing=spacing,  # type: ignore[arg-type]
        path=path,
        header=image.header,
    )
    if min_shape is not None:
        check_min_shape(record, min_shape)
    return record


def check_min_shape(
    record: VolumeRecord, min_shape: Sequence[int], what: str = "the crop size"
) -> None:
    """Raise :class:`VoCoDataError` unless ``record.shape >= min_shape`` on every axis."""
    _require_min_shape(record.shape, min_shape, record.path, what)


def _require_min_shape(shape, min_shape, path, what: str = "the crop size") -> None:
    min_shape = tuple(int(s) for s in min_shape)
    if len(min_shape) != 3:
        raise ValueError(f"min_shape must have 3 entries, got {min_shape}")
    if any(s < m for s, m in zip(shape, min_shape, strict=True)):
        raise VoCoDataError(
            f"volume shape {tuple(shape)} is smaller than {what} {min_shape} voxels", path
        )


def check_pair(image: VolumeRecord, label: VolumeRecord, atol_mm: float = 1e-3) -> None:
    """Check that a label map lies on its image's voxel grid (same shape and affine)."""
    if image.shape != label.shape:
        raise VoCoDataError(
            f"label map shape {label.shape} does not match image {image.path} shape {image.shape}",
            label.path,
        )
    if not np.allclose(image.affine, label.affine, atol=atol_mm):
        raise VoCoDataError(
            f"label map affine does not match image {image.path} affine "
            f"(max difference {np.abs(image.affine - label.affine).max():.4g} mm)",
            label.path,
        )


def write_volume(
    path: str | Path,
    array: np.ndarray,
    like: VolumeRecord | None = None,
    *,
    affine: np.ndarray | None = None,
) -> Path:
    """Write a 3-D array as NIfTI, atomically (temp file + ``os.replace``).

    The geometry comes from ``affine`` or else from ``like`` (its affine and
    header, so a result written next to its source overlays exactly); with
    neither, an identity affine (1 mm voxels) is used. The array's dtype is
    kept (no intensity scaling is stored). Compression follows the suffix.
    """
    path = Path(path)
    if not is_nifti_path(path):
        raise VoCoDataError("output must be named *.nii or *.nii.gz", path)
    array = np.asarray(array)
    if array.ndim != 3:
        raise VoCoDataError(f"cannot write a {array.ndim}-D array, expected 3-D", path)
    if array.dtype == np.bool_:
        array = array.astype(np.uint8)
    if like is not None and affine is None and array.shape != like.shape:
        raise VoCoDataError(
            f"array shape {array.shape} differs from the source volume's {like.shape}; "
            "pass the affine of the new grid",
            path,
        )
    if affine is None:
        affine = like.affine if like is not None else np.eye(4)
    header = like.header.copy() if like is not None and like.header is not None else None
    if not isinstance(header, nib.Nifti1Header | None):
        header = None
    image = nib.Nifti1Image(array, np.asarray(affine, dtype=np.float64), header=header)
    image.set_data_dtype(array.dtype)
    image.header.set_slope_inter(np.nan, np.nan)  # raw values, no scaling
    if header is None:
        image.header.set_xyzt_units("mm", "sec")

    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp{nifti_suffix(path)}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        nib.save(image, tmp)
        os.replace(tmp, path)
    except OSError as err:
        raise VoCoDataError(f"cannot write ({err.strerror or err})", path) from err
    finally:
        if tmp.parent.is_dir():
            tmp.unlink(missing_ok=True)
    return path


@dataclass(frozen=True)
class DatalistEntry:
    """One training case: an image file and, for finetuning, its label map."""

    image: Path
    label: Path | None = None


def load_datalist(
    source: str | Path, *, section: str = "training", require_labels: bool = False
) -> list[DatalistEntry]:
    """List the cases of a folder or a Decathlon-style JSON (see module doc).

    Checks that every listed file exists (a broken or looping symbolic link is
    named as such); it does not read them (that happens lazily, in
    :func:`read_volume`, with the same typed errors).
    """
    source = Path(source)
    _require_file_or_folder(source)
    if source.is_dir():
        json_path = _folder_dataset_json(source)
        if json_path is not None:
            return load_datalist(json_path, section=section, require_labels=require_labels)
        if (source / "imagesTr").is_dir():
            label_dir = source / "labelsTr"
            entries = [
                DatalistEntry(image, _paired_label(label_dir / image.name))
                for image in _nifti_files(source / "imagesTr", "image")
            ]
            where = source / "imagesTr"
        else:
            entries = [DatalistEntry(image) for image in _nifti_files(source, "image")]
            where = source
        if not entries:
            raise VoCoDataError("no NIfTI files (*.nii, *.nii.gz) found in this folder", where)
    else:
        entries = _read_json_datalist(source, section)
    if require_labels:
        for entry in entries:
            if entry.label is None:
                raise VoCoDataError("has no label map, but labels are required", entry.image)
    return entries


def read_dataset_json(data) -> dict:
    """The Decathlon-style JSON behind ``data``: ``data`` itself when it is a ``.json``
    path, the ``dataset.json`` of a folder, else (a NIfTI path, a folder without one,
    a list of entries) ``{}``.

    Raises :class:`VoCoDataError` naming the file when it is missing, unreadable,
    not JSON or not a JSON object.
    """
    if not isinstance(data, str | os.PathLike):
        return {}
    path = Path(data)
    if path.is_dir():
        path = _folder_dataset_json(path)
    elif path.suffix.lower() != ".json":
        path = None
    if path is None:
        return {}
    require_file(path, "datalist")
    try:
        spec = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise VoCoDataError(f"not a readable JSON datalist ({err})", path) from err
    if not isinstance(spec, dict):
        raise VoCoDataError(
            f"expected a JSON object (a Decathlon datalist), got a JSON {type(spec).__name__}",
            path,
        )
    return spec


def dataset_class_names(data) -> tuple[str, ...]:
    """Class names from the ``labels`` map of the JSON behind ``data`` (see
    :func:`read_dataset_json`), in class-index order; ``()`` when there is none.

    Both layouts are read: Decathlon ``{"0": "background", "1": "liver"}`` and
    nnU-Net v2 ``{"background": 0, "liver": 1}``. The indices must be exactly
    ``0 .. N-1``, else :class:`VoCoDataError` naming the JSON file.
    """
    labels = read_dataset_json(data).get("labels")
    if labels is None:
        return ()
    path = Path(data)
    return _class_names(labels, _folder_dataset_json(path) if path.is_dir() else path)


def _class_names(labels, path: Path) -> tuple[str, ...]:
    """``{index: name}`` or ``{name: index}`` -> names in index order (see above)."""
    expected = 'a "labels" object like {"0": "background", "1": "liver"}'
    if not isinstance(labels, dict) or not labels:
        raise VoCoDataError(f"expected {expected}, got {labels!r}", path)
    if all(isinstance(v, int) and not isinstance(v, bool) for v in labels.values()):
        pairs = [(value, name) for name, value in labels.items()]  # nnU-Net v2 layout
    else:
        pairs = []
        for key, name in labels.items():
            if not str(key).isdigit() or not isinstance(name, str) or not name.strip():
                raise VoCoDataError(f"expected {expected}, got {key!r}: {name!r}", path)
            pairs.append((int(key), name))
    by_index = dict(pairs)
    if sorted(by_index) != list(range(len(pairs))):
        raise VoCoDataError(
            f'"labels" indices must be the classes 0..{len(pairs) - 1}, each once, '
            f"got {sorted(index for index, _ in pairs)}",
            path,
        )
    return tuple(str(by_index[i]) for i in range(len(pairs)))


def _require_file_or_folder(source: Path) -> None:
    if source.is_dir():
        return
    if not source.exists() and not source.is_symlink():
        raise VoCoDataError("datalist or data folder not found", source)
    require_file(source, "datalist")


def _folder_dataset_json(folder: Path) -> Path | None:
    """``folder/dataset.json`` when it is there (even as a broken link, to be named)."""
    path = folder / "dataset.json"
    return path if path.is_file() or path.is_symlink() else None


def _nifti_files(folder: Path, kind: str) -> list[Path]:
    """The ``.nii``/``.nii.gz`` files directly in ``folder``, sorted by name."""
    try:
        children = sorted(folder.iterdir())
    except OSError as err:
        raise VoCoDataError(f"cannot list this folder ({err.strerror or err})", folder) from err
    files = [p for p in children if is_nifti_path(p) and not p.is_dir()]
    for file in files:
        require_file(file, kind)
    return files


def _paired_label(label: Path) -> Path | None:
    """The label map paired with an ``imagesTr/`` image, None when there is none."""
    if not label.is_file() and not label.is_symlink():
        return None
    require_file(label, "label map")
    return label


def _read_json_datalist(path: Path, section: str) -> list[DatalistEntry]:
    if path.suffix.lower() != ".json":
        raise VoCoDataError("expected a data folder or a Decathlon-style .json datalist", path)
    spec = read_dataset_json(path)
    if not isinstance(spec.get(section), list):
        raise VoCoDataError(f'expected a JSON object with a "{section}" list', path)
    if not spec[section]:
        raise VoCoDataError(f'the "{section}" list is empty', path)
    entries = []
    for n, item in enumerate(spec[section]):
        if isinstance(item, str):
            item = {"image": item}
        if not isinstance(item, dict) or not isinstance(item.get("image"), str):
            raise VoCoDataError(
                f'{section}[{n}] must be a path or an object with an "image" path, got {item!r}',
                path,
            )
        label = item.get("label")
        if label is not None and not isinstance(label, str):
            raise VoCoDataError(f'{section}[{n}]["label"] must be a path, got {label!r}', path)
        where = f"listed in {path.name} as {section}[{n}]"
        image = _listed_file(path.parent / item["image"], "image", where)
        entries.append(DatalistEntry(image, _listed_file(path.parent / label, "label map", where)
                                     if label else None))
    return entries


def _listed_file(file: Path, kind: str, where: str) -> Path:
    """``file`` checked (its message saying ``where`` it was listed) and made absolute."""
    require_file(file, kind, where)
    return file.resolve()
