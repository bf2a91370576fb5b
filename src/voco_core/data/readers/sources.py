"""Volume sources: what a volume path may be, which reader takes it, and the volumes
a folder holds.

A source is a NIfTI file (``.nii``, ``.nii.gz``; :mod:`~voco_core.data.readers.nifti`),
a NRRD (``.nrrd``, ``.nhdr``) or MetaImage (``.mha``, ``.mhd``) file
(:mod:`~voco_core.data.readers.itk`), or a folder holding one DICOM series
(:mod:`~voco_core.data.readers.dicom`). Suffixes match in any case; a folder is
recognised as DICOM by a cheap look at its files (:func:`looks_like_dicom_folder`).
Nothing here reads voxel data.
"""

from __future__ import annotations

import os
from pathlib import Path

from voco_core.data.readers.nifti import is_nifti_path, nifti_suffix, require_file
from voco_core.errors import VoCoDataError

ACCEPTED = ("a NIfTI (.nii, .nii.gz), NRRD (.nrrd, .nhdr) or MetaImage (.mha, .mhd) file, "
            "or a folder holding one DICOM series")
"""What a volume path may be, for error messages."""

NRRD_SUFFIXES = (".nrrd", ".nhdr")
METAIMAGE_SUFFIXES = (".mha", ".mhd")
ITK_FILE_SUFFIXES = NRRD_SUFFIXES + METAIMAGE_SUFFIXES
"""File name endings read with SimpleITK (any case)."""

_SNIFF_FILES = 64  # files looked at to decide whether a folder holds DICOM


# --------------------------------------------------------------------------- by name


def file_format(path: str | Path) -> str | None:
    """``"NRRD"`` or ``"MetaImage"`` from the file name's ending (any case), else None."""
    name = str(path).lower()
    if name.endswith(NRRD_SUFFIXES):
        return "NRRD"
    if name.endswith(METAIMAGE_SUFFIXES):
        return "MetaImage"
    return None


def is_volume_file_path(path: str | Path) -> bool:
    """True when the name ends like a volume file this package reads (NIfTI, NRRD, MetaImage)."""
    return is_nifti_path(path) or file_format(path) is not None


def is_series_folder(path: Path) -> bool:
    """A folder (not one named like a volume file) read as one DICOM series."""
    return path.is_dir() and not is_volume_file_path(path)


def volume_stem(path: Path) -> str:
    """The name without its volume suffix: ``case_001`` for ``case_001.nii.gz`` or
    ``case_001.nrrd``; a folder's (a DICOM series') own name."""
    if is_nifti_path(path) and not path.is_dir():
        return path.name[: -len(nifti_suffix(path))]
    if file_format(path) is not None and not path.is_dir():
        return path.name[: -len(Path(path.name).suffix)]
    return path.name or path.resolve().name


# --------------------------------------------------------------------------- DICOM folders


def is_dicom_file(path: Path) -> bool:
    """A ``.dcm`` name or the DICOM Part 10 marker (``DICM`` after the 128-byte preamble)."""
    if path.suffix.lower() == ".dcm":
        return True
    try:
        with open(path, "rb") as file:
            file.seek(128)
            return file.read(4) == b"DICM"
    except OSError:
        return False


def looks_like_dicom_folder(folder: Path) -> bool:
    """Whether ``folder`` directly holds DICOM files (a cheap look at up to 64 files,
    for the napari reader hook and folder listings;
    :func:`~voco_core.data.readers.dicom.read_dicom_series` decides)."""
    try:
        with os.scandir(folder) as entries:
            checked = 0
            for entry in entries:
                if entry.name.startswith(".") or not entry.is_file():
                    continue
                if is_dicom_file(Path(entry.path)):
                    return True
                checked += 1
                if checked >= _SNIFF_FILES:
                    return False
    except OSError:
        return False
    return False


# --------------------------------------------------------------------------- listing


def require_volume_source(path: Path, kind: str, where: str = "") -> None:
    """Like :func:`~voco_core.data.readers.nifti.require_file`, but a folder is accepted
    as a DICOM series (its content is checked when it is read)."""
    if is_series_folder(path):
        return
    require_file(path, kind, where)


def volume_sources(folder: Path, kind: str) -> list[Path]:
    """The volumes directly in ``folder``, sorted by name: NIfTI, NRRD and MetaImage
    files, and subfolders that hold DICOM files (one series each, checked on read).
    A ``.nhdr`` / ``.mhd`` header's data file (``.raw``) is not a volume of its own."""
    try:
        children = sorted(folder.iterdir())
    except OSError as err:
        raise VoCoDataError(f"cannot list this folder ({err.strerror or err})", folder) from err
    sources = []
    for child in children:
        if child.is_dir():
            if not is_volume_file_path(child) and looks_like_dicom_folder(child):
                sources.append(child)
        elif is_volume_file_path(child):
            require_file(child, kind)
            sources.append(child)
    return sources
