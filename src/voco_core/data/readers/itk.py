"""Volumes that are not NIfTI: DICOM series, NRRD and MetaImage, read through SimpleITK.

:func:`voco_core.data.io.read_volume` hands every path that is not named ``*.nii`` /
``*.nii.gz`` to :func:`read_other_volume`; :func:`voco_core.data.io.check_volume_header`
hands it to :func:`check_other_header`. Both give what a NIfTI read gives: the
voxel array in storage order, a RAS+ affine and the spacing, or one
:class:`~voco_core.errors.VoCoDataError` line naming the file or folder.

Accepted
--------
- **NRRD**: ``.nrrd`` (header and data in one file) or ``.nhdr`` (detached header).
- **MetaImage**: ``.mha`` (one file) or ``.mhd`` (header beside a ``.raw`` / ``.zraw``).
- **DICOM series**: a folder holding the files of exactly one series
  (SeriesInstanceUID), not searched recursively. GDCM sorts the slices by their
  Image Position (Patient) along the slice normal, and the series must have at
  least two slices, evenly spaced (within
  :data:`~voco_core.data.readers.dicom.DICOM_POSITION_TOLERANCE_MM`),
  stacked along the normal (no gantry tilt) and sharing one orientation.

Every image must be 3-D with one number per voxel; a 4-D image whose fourth axis
has length 1 is read as 3-D. Several components per voxel (RGB, vector, or a
4-D multi-channel image) are refused in
:func:`~voco_core.data.readers.itk_headers.require_scalar_3d`; multi-channel images in these
formats are given as one file per channel in a datalist (docs/data.md).

Geometry
--------
ITK stores a volume as ``size = (I, J, K)``, ``spacing`` (mm), ``origin`` and a
direction matrix whose columns are the voxel axes, all in **LPS+** (x to the
patient's Left, y Posterior). SimpleITK's ``GetArrayFromImage`` returns the voxels
as ``[k, j, i]``. Here the array is transposed to ``[i, j, k]`` (a view, no copy)
and the geometry converted to nibabel's RAS+ convention by flipping the signs of
x and y::

    affine[:3, :3] = diag(-1, -1, 1) @ direction @ diag(spacing)
    affine[:3, 3]  = diag(-1, -1, 1) @ origin

so ``affine @ (i, j, k, 1)`` is the voxel's centre in RAS+ mm, as for NIfTI. NRRD
files written in RAS or other spaces are converted to LPS by ITK on read.

A DICOM series' third axis always points along the slice normal (the cross
product of the row and column directions), so a left-handed volume saved as DICOM
comes back with its ``k`` axis reversed, the same world picture stored the other
way round. DICOM stores positions as decimal strings of at most 16 characters, so
a series' affine matches its source to about
:data:`~voco_core.data.readers.dicom.DICOM_POSITION_TOLERANCE_MM`.

Checks before reading
---------------------
The header is read first (``ImageFileReader.ReadImageInformation``, no voxel
data), and dimension, components and pixel type are checked. For NRRD and
MetaImage the claimed voxel bytes must fit in the file that holds them (see
:func:`~voco_core.data.readers.itk_headers.check_claimed_size`): raw data must be all
there, gzip/zlib data can expand at most
:data:`~voco_core.data.readers.nifti.MAX_DEFLATE_RATIO` times. Not
checked beforehand: bzip2-encoded NRRD, data split over several files, and DICOM
pixel data (bounded per slice by the 16-bit Rows/Columns; GDCM refuses a slice
whose pixel data are short).

Why SimpleITK
-------------
One well-kept reader for all three formats, including DICOM series discovery and
sorting by position (GDCM), with geometry in one convention, as a single wheel.
MONAI's ``ITKReader`` needs the much larger ``itk`` package, and its
``PydicomReader`` reads DICOM only.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from voco_core.data.readers.dicom import one_series, read_dicom_series
from voco_core.data.readers.itk_headers import (
    ITEM_BYTES,
    check_claimed_size,
    header_reader,
    itk_reason,
    quiet_itk,
    require_metaimage_header,
    require_nrrd_data_file,
    require_scalar_3d,
)
from voco_core.data.readers.nifti import require_file
from voco_core.data.readers.sources import ACCEPTED, file_format, is_series_folder
from voco_core.errors import VoCoDataError

LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0])
"""ITK's LPS+ world to nibabel's RAS+ (its own inverse)."""

_IMAGE_IO = {"NRRD": "NrrdImageIO", "MetaImage": "MetaImageIO"}


# --------------------------------------------------------------------------- reading


def read_other_volume(path: Path, kind: str = "image"
                      ) -> tuple[np.ndarray, np.ndarray, tuple[float, float, float]]:
    """Read a NRRD or MetaImage file or a DICOM series folder (see module doc).

    Returns ``(array, affine, spacing)``: the voxels ``(I, J, K)`` in storage order,
    the ``(4, 4)`` voxel -> RAS+ mm affine and the voxel size in mm along
    ``(i, j, k)``. Raises :class:`VoCoDataError` naming ``path``.
    """
    path = Path(path)
    if is_series_folder(path):
        image = read_dicom_series(path, kind)
    elif file_format(path) is not None:
        image = _read_itk_file(path, kind)
    else:
        require_file(path, kind)
        raise VoCoDataError(f"not a NIfTI file or other volume: expected {ACCEPTED}", path)
    array, affine, spacing = image_to_array_affine(image)
    require_finite(array, kind, path)
    return array, affine, spacing


def check_other_header(path: Path, kind: str = "image") -> tuple[int, int, int]:
    """Shape ``(I, J, K)`` of a NRRD/MetaImage file or DICOM series folder from headers
    alone (the checks of :func:`read_other_volume` that need no voxel data)."""
    path = Path(path)
    if is_series_folder(path):
        files = one_series(path, kind).files
        reader = header_reader(Path(files[0]), "GDCMImageIO", "DICOM", path)
        columns, rows = require_scalar_3d(reader, kind, path)[:2]
        return int(columns), int(rows), len(files)
    if file_format(path) is None:
        require_file(path, kind)
        raise VoCoDataError(f"not a NIfTI file or other volume: expected {ACCEPTED}", path)
    return _check_itk_header(path, kind)


def image_to_array_affine(image: sitk.Image
                          ) -> tuple[np.ndarray, np.ndarray, tuple[float, float, float]]:
    """A 3-D (or 4-D, fourth axis of length 1) scalar SimpleITK image as ``(array
    (I, J, K), affine (4, 4) voxel -> RAS+ mm, spacing (mm along i, j, k))``."""
    dimension = image.GetDimension()
    array = sitk.GetArrayFromImage(image)  # [k, j, i] (4-D: [t, k, j, i])
    if dimension == 4:
        array = array[0]
    array = array.transpose(2, 1, 0)  # [i, j, k], the NIfTI storage order
    direction = np.asarray(image.GetDirection(), dtype=np.float64).reshape(dimension, dimension)
    spacing = np.asarray(image.GetSpacing()[:3], dtype=np.float64)
    origin = np.asarray(image.GetOrigin()[:3], dtype=np.float64)
    affine = np.eye(4)
    affine[:3, :3] = LPS_TO_RAS @ direction[:3, :3] @ np.diag(spacing)
    affine[:3, 3] = LPS_TO_RAS @ origin
    return array, affine, tuple(float(s) for s in spacing)  # type: ignore[return-value]


def require_finite(array: np.ndarray, kind: str, path: Path) -> None:
    """Raise :class:`VoCoDataError` when floating-point voxels are NaN or infinite."""
    if not np.issubdtype(array.dtype, np.floating):
        return
    finite = np.isfinite(array)
    if not finite.all():
        bad = int(finite.size - np.count_nonzero(finite))
        what = "all voxels are NaN/inf" if bad == finite.size else f"{bad} voxels are NaN/inf"
        raise VoCoDataError(f"{what}; expected finite {kind} values", path)


def _read_itk_file(path: Path, kind: str) -> sitk.Image:
    """Header checks, then the voxels, of a NRRD or MetaImage file."""
    _check_itk_header(path, kind)
    fmt = file_format(path)
    reader = sitk.ImageFileReader()
    reader.SetImageIO(_IMAGE_IO[fmt])
    reader.SetFileName(str(path))
    try:
        with quiet_itk():
            return reader.Execute()
    except RuntimeError as err:
        raise VoCoDataError(f"data cannot be read: the file is truncated or corrupt "
                            f"({itk_reason(err)})", path) from err


def _check_itk_header(path: Path, kind: str) -> tuple[int, int, int]:
    fmt = file_format(path)
    require_file(path, kind)
    if fmt == "MetaImage":
        require_metaimage_header(path)
    else:
        require_nrrd_data_file(path)
    reader = header_reader(path, _IMAGE_IO[fmt], fmt, path)
    shape = require_scalar_3d(reader, kind, path)
    check_claimed_size(path, fmt, math.prod(shape) * ITEM_BYTES[reader.GetPixelID()])
    spacing = reader.GetSpacing()[:3]
    if any(not math.isfinite(s) or s <= 0 for s in spacing):
        raise VoCoDataError(f"voxel spacing {tuple(spacing)} mm is not positive", path)
    return shape


# --------------------------------------------------------------------------- writing


def write_itk_volume(path: Path, array: np.ndarray, affine: np.ndarray) -> Path:
    """Write a 3-D array ``(I, J, K)`` with its voxel -> RAS+ mm ``affine`` as a one-file
    NRRD (``.nrrd``) or MetaImage (``.mha``), atomically (temp file + ``os.replace``)."""
    path = Path(path)
    if path.suffix.lower() not in (".nrrd", ".mha"):
        raise VoCoDataError("output must be named *.nrrd or *.mha", path)
    array = np.asarray(array)
    if array.dtype == np.bool_:
        array = array.astype(np.uint8)
    image = sitk.GetImageFromArray(np.ascontiguousarray(array.transpose(2, 1, 0)))
    linear = LPS_TO_RAS @ np.asarray(affine, dtype=np.float64)[:3, :3]
    spacing = np.linalg.norm(linear, axis=0)
    image.SetSpacing(spacing.tolist())
    image.SetDirection((linear / spacing).ravel().tolist())
    image.SetOrigin((LPS_TO_RAS @ np.asarray(affine, dtype=np.float64)[:3, 3]).tolist())
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp{path.suffix}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        sitk.WriteImage(image, str(tmp), useCompression=True)
        os.replace(tmp, path)
    except (OSError, RuntimeError) as err:
        raise VoCoDataError(f"cannot write ({itk_reason(err)})", path) from err
    finally:
        tmp.unlink(missing_ok=True)
    return path
