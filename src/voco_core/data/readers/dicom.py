"""DICOM series: a folder holding the files of one series, read through SimpleITK (GDCM).

Rules (what :func:`read_dicom_series` accepts): the folder directly holds the files
of exactly one series (SeriesInstanceUID; not searched recursively; several series
are listed in the error), every DICOM file in it belongs to that series, the series
has at least two slices, and the slices' Image Position (Patient) form an evenly
spaced stack along the slice normal (within :data:`DICOM_POSITION_TOLERANCE_MM`: no
missing slice, no gantry tilt, no two slices at one position) with one orientation
throughout. GDCM sorts the slices along the normal, so the volume's third axis
points along it; the geometry conversion to RAS+ is
:func:`voco_core.data.readers.itk.image_to_array_affine`'s. Whether a folder
looks like DICOM at all is :func:`voco_core.data.readers.sources.looks_like_dicom_folder`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from voco_core.data.readers.itk_headers import (
    header_reader,
    itk_reason,
    quiet_itk,
    require_scalar_3d,
)
from voco_core.data.readers.sources import ACCEPTED, is_dicom_file
from voco_core.errors import VoCoDataError

DICOM_POSITION_TOLERANCE_MM = 1e-2
"""How far a DICOM slice may lie from the evenly spaced stack the affine describes
(absolute, or 1% of the slice spacing when that is more). DICOM decimal strings
(16 characters) keep positions to ~1e-4 mm or better in practice."""


@dataclass(frozen=True)
class DicomSeries:
    """One DICOM series in a folder: its SeriesInstanceUID, SeriesDescription (may be
    empty) and files, in GDCM's order (sorted by position along the slice normal)."""

    uid: str
    description: str
    files: tuple[str, ...]

    def summary(self) -> str:
        description = f" {self.description!r}" if self.description else ""
        return f"{self.uid}{description} ({len(self.files)} files)"


def list_dicom_series(folder: Path) -> list[DicomSeries]:
    """The DICOM series directly in ``folder`` (not in subfolders), by UID."""
    series = []
    with quiet_itk():
        for uid in sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(folder)):
            files = sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder), uid)
            series.append(DicomSeries(uid, _series_description(files[0]), tuple(files)))
    return series


def read_dicom_series(folder: Path, kind: str = "image") -> sitk.Image:
    """The one DICOM series in ``folder`` as a 3-D SimpleITK image (module doc: rules)."""
    files = one_series(folder, kind).files
    first = header_reader(Path(files[0]), "GDCMImageIO", "DICOM", folder)
    require_scalar_3d(first, kind, folder)
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(list(files))
    reader.MetaDataDictionaryArrayUpdateOn()
    try:
        with quiet_itk():
            image = reader.Execute()
    except RuntimeError as err:
        raise VoCoDataError(f"DICOM series cannot be read: a slice is truncated or corrupt "
                            f"({itk_reason(err)})", folder) from err
    if image.GetNumberOfComponentsPerPixel() > 1:
        raise VoCoDataError(f"DICOM series has {image.GetNumberOfComponentsPerPixel()} "
                            f"components per voxel (RGB), expected a grey-value {kind}", folder)
    _check_slice_positions(reader, image, folder, kind)
    return image


def one_series(folder: Path, kind: str) -> DicomSeries:
    series = list_dicom_series(folder)
    if not series:
        raise VoCoDataError(f"is a folder holding no DICOM series: expected {ACCEPTED}",
                            folder)
    if len(series) > 1:
        listed = "; ".join(s.summary() for s in series)
        raise VoCoDataError(f"holds {len(series)} DICOM series, expected one per folder "
                            f"(move each into its own folder): {listed}", folder)
    listed = {Path(file).name for file in series[0].files}
    unread = sorted(p.name for p in folder.iterdir() if p.is_file() and p.name not in listed
                    and p.name.upper() != "DICOMDIR" and is_dicom_file(p))
    if unread:
        names = ", ".join(unread[:3]) + (f" and {len(unread) - 3} more" if len(unread) > 3 else "")
        raise VoCoDataError(f"{len(unread)} DICOM file(s) are not part of the readable series "
                            f"{series[0].uid} (truncated or corrupt?): {names}; expected every "
                            f"file of the series to be readable", folder)
    if len(series[0].files) < 2:
        raise VoCoDataError(f"DICOM series {series[0].uid} has a single slice (a 2-D image), "
                            f"expected a 3-D {kind} of at least 2 slices", folder)
    return series[0]


def _series_description(file: str) -> str:
    reader = sitk.ImageFileReader()
    reader.SetImageIO("GDCMImageIO")
    reader.SetFileName(file)
    try:
        reader.ReadImageInformation()
    except RuntimeError:
        return ""
    key = "0008|103e"
    return reader.GetMetaData(key).strip() if reader.HasMetaDataKey(key) else ""


def _check_slice_positions(reader: sitk.ImageSeriesReader, image: sitk.Image, folder: Path,
                           kind: str) -> None:
    """The slices' Image Position (Patient) must form the evenly spaced stack along the
    slice normal that the image's geometry describes, with one orientation throughout."""
    count = image.GetSize()[2]
    positions, orientations = [], set()
    for index in range(count):
        if not reader.HasMetaDataKey(index, "0020|0032"):
            raise VoCoDataError(
                f"DICOM slice {index} has no Image Position (Patient), so the slices' "
                f"geometry is unknown: expected a 3-D {kind} series (CT, MR, PET, ...)", folder)
        positions.append(_decimals(reader.GetMetaData(index, "0020|0032")))
        if reader.HasMetaDataKey(index, "0020|0037"):
            orientations.add(tuple(np.round(_decimals(reader.GetMetaData(index, "0020|0037")),
                                            4)))
    if len(orientations) > 1:
        raise VoCoDataError(f"DICOM series mixes {len(orientations)} slice orientations, "
                            f"expected one stack of parallel slices", folder)
    positions = np.asarray(positions)
    direction = np.asarray(image.GetDirection()).reshape(3, 3)
    spacing = image.GetSpacing()[2]
    expected = np.asarray(image.GetOrigin()) + np.outer(np.arange(count),
                                                        direction[:, 2] * spacing)
    offsets = np.linalg.norm(positions - expected, axis=1)
    tolerance = max(DICOM_POSITION_TOLERANCE_MM, 0.01 * spacing)
    steps = np.diff(positions @ direction[:, 2])
    if steps.min() < tolerance:
        index = int(np.argmin(steps))
        raise VoCoDataError(f"DICOM slices {index} and {index + 1} lie at the same position "
                            f"(several acquisitions in one series?), expected one slice per "
                            f"position", folder)
    if offsets.max() > tolerance:
        index = int(np.argmax(offsets))
        raise VoCoDataError(
            f"DICOM slice {index} lies {offsets.max():.3g} mm from an evenly spaced stack "
            f"along the slice normal (missing slices, uneven spacing or gantry tilt), "
            f"expected evenly spaced parallel slices", folder)


def _decimals(text: str) -> np.ndarray:
    try:
        return np.asarray([float(value) for value in text.split("\\")], dtype=np.float64)
    except ValueError:
        return np.full(3, np.nan)
