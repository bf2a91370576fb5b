"""The public front for volumes: :class:`VolumeRecord`, :func:`read_volume` (and
:func:`read_channels`), :func:`check_volume_header`, :func:`write_volume` and the
grid checks :func:`check_min_shape` and :func:`check_pair`.

:func:`read_volume` reads NIfTI (``.nii``, ``.nii.gz``) with nibabel (checks before
the read: :mod:`voco_core.data.readers.nifti`) and, through
:mod:`voco_core.data.readers.itk` (SimpleITK), NRRD (``.nrrd``, ``.nhdr``), MetaImage
(``.mha``, ``.mhd``) and a folder holding one DICOM series, all to the same
convention (which reader takes a path: :mod:`voco_core.data.readers.sources`).
:func:`write_volume` writes NIfTI.

Axis convention
---------------
A :class:`VolumeRecord` keeps the voxel array exactly in the file's storage
order: ``array[i, j, k]`` is voxel ``(i, j, k)`` and ``affine @ (i, j, k, 1)`` is
its centre in world millimetres, RAS+ (x to the patient's Right, y Anterior,
z Superior), as nibabel defines it. Nothing is reoriented on read, so writing a
result back with the source affine overlays exactly. ``spacing`` is the voxel
size in mm along ``i, j, k``; ``orientation`` is nibabel's axis code (e.g.
``"RAS"`` or ``"LPS"``) saying which world direction each voxel axis points to.

Channels
--------
An image may have several channels: a 4-D file ``(I, J, K, C)`` (channels last, as
NIfTI stores them) or one file per channel listed together (:func:`read_channels`;
the files must lie on one voxel grid). ``array`` is then ``(I, J, K, C)``; ``shape``
is always the spatial ``(I, J, K)``. Label maps have one channel.

Datalists
---------
Which volumes a folder or a Decathlon-style JSON lists is
:mod:`voco_core.data.datalists` (:func:`~voco_core.data.datalists.load_datalist`);
an image listed there as several channel files is read here by :func:`read_channels`.

Image or label map
------------------
:func:`looks_like_labels` (from :mod:`voco_core.data.labelmaps`) decides whether a
volume is a label map or an intensity image; the napari reader and ``voco info``
both use it.

Every problem raises :class:`~voco_core.errors.VoCoDataError` naming the file.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import nibabel as nib
import numpy as np

from voco_core.data.datalists import is_channel_list
from voco_core.data.labelmaps import looks_like_labels
from voco_core.data.readers.itk import check_other_header, read_other_volume
from voco_core.data.readers.nifti import READ_ERRORS, is_nifti_path, nifti_suffix, open_nifti
from voco_core.data.readers.sources import volume_stem
from voco_core.errors import VoCoDataError

RAS_LABELS = (("L", "R"), ("P", "A"), ("I", "S"))
"""MONAI ``Orientation`` axis labels for nibabel's convention (what a
:class:`VolumeRecord`'s affine means): axis codes point to R, A, S."""


@dataclass(frozen=True, eq=False)
class VolumeRecord:
    """One 3-D volume and its geometry.

    Attributes:
        array: voxel data, shape ``(I, J, K)`` in file storage order (see module doc),
            or ``(I, J, K, C)`` for an image of ``C > 1`` channels (channels last, as
            NIfTI stores them; a label map always has one channel).
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
    channel_files: tuple[Path, ...] = ()
    """The files the channels were read from when listed together (see
    :func:`read_channels`); ``path`` is then the first of them. Empty otherwise."""

    @property
    def shape(self) -> tuple[int, int, int]:
        """The spatial shape ``(I, J, K)`` (without the channel axis)."""
        return tuple(int(s) for s in self.array.shape[:3])  # type: ignore[return-value]

    @property
    def channels(self) -> int:
        """Number of channels: 1 for an ``(I, J, K)`` array, ``C`` for ``(I, J, K, C)``."""
        return 1 if self.array.ndim == 3 else int(self.array.shape[3])

    @property
    def orientation(self) -> str:
        """nibabel axis code of the voxel axes, e.g. ``"RAS"``."""
        return "".join(nib.aff2axcodes(self.affine))

    @property
    def has_integer_dtype(self) -> bool:
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
        """File name without its suffix (``"case_001"`` for ``case_001.nii.gz`` or
        ``case_001.nrrd``); a DICOM series folder's name."""
        if self.path is None:
            return "volume"
        return volume_stem(self.path)

    def describe(self) -> dict:
        """Plain-type summary (what ``voco info`` prints)."""
        data = self.array
        summary = {
            "file": str(self.path) if self.path else None,
            "shape": list(self.shape),
            "channels": self.channels,
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
    path: str | Path | Sequence[str | Path], *, kind: str = "image",
    min_shape: Sequence[int] | None = None
) -> tuple[int, ...]:
    """Cheap pre-flight check from the header alone (no voxel data is read): the file
    exists, is NIfTI, is 3-D (or 4-D with channels last) and, when ``min_shape`` is
    given, is at least that large. Returns the shape: ``(I, J, K)``, or ``(I, J, K, C)``
    for ``C > 1`` channels; raises :class:`VoCoDataError`. ``path`` may be a list of
    channel files (:func:`check_channel_headers`)."""
    if is_channel_list(path):
        return check_channel_headers(path, kind=kind, min_shape=min_shape)
    path = Path(path)
    if is_nifti_path(path):
        _, shape = open_nifti(path, kind)
    else:  # NRRD, MetaImage or a DICOM series folder (readers.itk)
        shape = check_other_header(path, kind)
    if min_shape is not None:
        _require_min_shape(shape[:3], min_shape, path)
    return shape  # type: ignore[return-value]


def check_channel_headers(paths: Sequence[str | Path], *, kind: str = "image",
                          min_shape: Sequence[int] | None = None) -> tuple[int, ...]:
    """:func:`check_volume_header` for one image listed as channel files: every file
    passes it and all lie on the first one's voxel grid (same shape and affine, to
    1e-3 mm). Returns ``(I, J, K, C)`` with ``C`` the channels of all files together
    (``(I, J, K)`` for one single-channel file)."""
    paths = _channel_paths(paths)
    grids = []  # (shape, affine) of each file; the affine from NIfTI headers only
    for path in paths:
        if is_nifti_path(path):
            image, shape = open_nifti(path, kind)
            grids.append((shape, np.asarray(image.affine, dtype=np.float64)))
        else:  # other formats: shape here, affine once read (read_channels checks it)
            grids.append((check_volume_header(path, kind=kind), None))
    first_shape, first_affine = grids[0]
    for path, (shape, affine) in zip(paths, grids, strict=True):
        _require_same_grid(paths[0], first_shape[:3], first_affine, path, shape[:3], affine)
    channels = sum(shape[3] if len(shape) == 4 else 1 for shape, _ in grids)
    if min_shape is not None:
        _require_min_shape(first_shape[:3], min_shape, paths[0])
    return (*first_shape[:3], channels) if channels > 1 else tuple(first_shape[:3])


def _channel_paths(paths: Sequence[str | Path]) -> list[Path]:
    paths = [Path(p) for p in paths]
    if not paths:
        raise VoCoDataError("an image given as a list of channel files needs at least one file")
    return paths


def _require_same_grid(first: Path, first_shape, first_affine: np.ndarray | None, path: Path,
                       shape, affine: np.ndarray | None, atol_mm: float = 1e-3) -> None:
    """Channel files listed together must share one voxel grid (else the channels of a
    voxel would be different places in the body); an affine of None is not compared."""
    if tuple(shape) != tuple(first_shape):
        raise VoCoDataError(f"channel file shape {tuple(shape)} differs from {first.name}'s "
                            f"{tuple(first_shape)}; the channel files of one image must lie "
                            "on one voxel grid", path)
    if affine is not None and first_affine is not None and not np.allclose(
            affine, first_affine, atol=atol_mm):
        raise VoCoDataError(f"channel file affine differs from {first.name}'s (max difference "
                            f"{np.abs(affine - first_affine).max():.4g} mm); the channel files "
                            "of one image must lie on one voxel grid", path)


def read_channels(paths: Sequence[str | Path], *, kind: str = "image",
                  min_shape: Sequence[int] | None = None) -> VolumeRecord:
    """One image from channel files listed together (as BraTS lists t1, t1c, t2, flair):
    each read with :func:`read_volume`, all on the first file's voxel grid (else a
    :class:`VoCoDataError` naming the file that differs), stacked channels last in list
    order: ``array`` ``(I, J, K, C)`` (``(I, J, K)`` for one single-channel file).
    ``path`` and ``header`` are the first file's; ``channel_files`` lists them all."""
    paths = _channel_paths(paths)
    check_channel_headers(paths, kind=kind, min_shape=min_shape)  # before reading voxels
    records = [read_volume(path, kind=kind) for path in paths]
    first = records[0]
    for record in records[1:]:
        _require_same_grid(first.path, first.shape, first.affine, record.path, record.shape,
                           record.affine)
    array = records[0].array if len(records) == 1 else np.concatenate(
        [r.array if r.array.ndim == 4 else r.array[..., None] for r in records], axis=3)
    return VolumeRecord(array=array, affine=first.affine, spacing=first.spacing,
                        path=first.path, header=first.header, channel_files=tuple(paths))


def read_volume(
    path: str | Path | Sequence[str | Path],
    *,
    kind: str = "image",
    min_shape: Sequence[int] | None = None,
) -> VolumeRecord:
    """Read a 3-D volume: NIfTI (``.nii`` or ``.nii.gz``), NRRD (``.nrrd``, ``.nhdr``),
    MetaImage (``.mha``, ``.mhd``) or a folder holding one DICOM series (the last three
    through :func:`voco_core.data.readers.itk.read_other_volume`; ``header`` is then None).

    Args:
        path: the file or DICOM series folder, or a list of channel files of one
            image (:func:`read_channels`).
        kind: ``"image"`` or ``"label map"``; a label map must have one channel,
            otherwise only used in error messages.
        min_shape: when given, the volume must be at least this large along
            each voxel axis (e.g. the crop size), else :class:`VoCoDataError`.

    A 4-D image file ``(I, J, K, C)`` holds ``C`` channels (channels last; length-1
    extra axes are dropped). Raises :class:`VoCoDataError` for a missing file, a
    non-NIfTI file, a truncated or corrupt file, data that is not 3-D (or 4-D),
    and non-finite voxels.
    """
    if is_channel_list(path):
        return read_channels(path, kind=kind, min_shape=min_shape)
    path = Path(path)
    if not is_nifti_path(path):  # NRRD, MetaImage or a DICOM series folder
        array, affine, spacing = read_other_volume(path, kind)
        record = VolumeRecord(array=array, affine=affine, spacing=spacing, path=path)
        if min_shape is not None:
            check_min_shape(record, min_shape)
        return record
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
