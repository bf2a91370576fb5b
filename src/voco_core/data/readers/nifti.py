"""Checks on a NIfTI file before its voxels are read.

Everything here works from the file system and the header alone, so a bad file is
refused with one :class:`~voco_core.errors.VoCoDataError` line before anything
large is allocated: a missing file, a broken or looping symbolic link, a non-NIfTI
name or content, a shape that is not 3-D, a non-numeric voxel type, and a header
that claims more voxel data than the file can hold. :func:`require_file` (the file
exists and is one) is shared by the other readers and the datalists.
"""

from __future__ import annotations

import errno
import math
import os
import zlib
from pathlib import Path

import nibabel as nib
import numpy as np

from voco_core.errors import VoCoDataError

NIFTI_SUFFIXES = (".nii", ".nii.gz")

MAX_DEFLATE_RATIO = 1032
"""Most bytes one compressed byte can inflate to with deflate (gzip): zlib's limit
is about 1032:1, reached only by constant data."""

# Errors nibabel/numpy/gzip raise on unreadable, truncated or corrupt files.
READ_ERRORS = (nib.filebasedimages.ImageFileError, OSError, EOFError, zlib.error, ValueError)


def is_nifti_path(path: str | Path) -> bool:
    """True when the file name ends in ``.nii`` or ``.nii.gz`` (any case)."""
    return str(path).lower().endswith(NIFTI_SUFFIXES)


def nifti_suffix(path: Path) -> str:
    """``".nii.gz"`` or ``".nii"``, whichever the file name ends in (any case)."""
    return ".nii.gz" if str(path).lower().endswith(".nii.gz") else ".nii"


def require_file(path: Path, kind: str, where: str = "") -> None:
    """Raise :class:`VoCoDataError` unless ``path`` is (or links to) an existing file.

    ``where`` (e.g. ``"listed in dataset.json as training[3]"``) ends the message.
    """
    if path.is_file():
        return
    suffix = f" ({where})" if where else ""
    if path.is_symlink():  # the link itself exists, its target does not resolve
        try:
            target = os.readlink(path)
            os.stat(path)
        except OSError as err:
            why = "loops" if err.errno == errno.ELOOP else "points to a missing file"
            raise VoCoDataError(
                f"{kind} is a broken symbolic link: it {why} ({path.name} -> {target}){suffix}",
                path,
            ) from err
    if path.is_dir():
        raise VoCoDataError(
            f"is a folder, expected a NIfTI {kind} file (.nii or .nii.gz){suffix}", path
        )
    if not path.exists():
        raise VoCoDataError(f"{kind} file not found{suffix}", path)
    raise VoCoDataError(f"is not a regular file, expected a NIfTI {kind} file{suffix}", path)


def open_nifti(path: Path, kind: str):
    """Open a NIfTI file lazily (header only) and check it is a 3-D volume whose
    voxel data the file can hold (see :func:`_check_claimed_size`).

    Returns the image and its shape: ``(I, J, K)``, or ``(I, J, K, C)`` for an image
    with ``C > 1`` channels last (trailing length-1 axes are dropped; a label map must
    have one channel)."""
    path = Path(path)
    require_file(path, kind)
    if not is_nifti_path(path):
        raise VoCoDataError(
            f"not a NIfTI file: expected a {kind} file named *.nii or *.nii.gz", path
        )
    try:
        image = nib.load(path)
    except READ_ERRORS as err:
        raise VoCoDataError(f"cannot be read as NIfTI ({type(err).__name__}: {err})", path) from err
    if not isinstance(image, nib.Nifti1Image | nib.Nifti2Image):
        raise VoCoDataError(f"is a {type(image).__name__}, expected a NIfTI-1/2 {kind}", path)

    shape = tuple(int(s) for s in image.shape)
    while len(shape) > 3 and shape[-1] == 1:  # single channel / time point
        shape = shape[:-1]
    if len(shape) == 5 and shape[3] == 1:  # NIfTI's vector layout (I, J, K, 1, C)
        shape = (*shape[:3], shape[4])
    if len(shape) < 3:
        raise VoCoDataError(
            f"is {len(shape)}-D with shape {shape}, expected a 3-D {kind} volume", path
        )
    if len(shape) == 4 and kind == "label map":
        raise VoCoDataError(
            f"is 4-D with shape {shape} ({shape[3]} channels), expected a 3-D label map "
            "(one channel)", path)
    if len(shape) > 4:
        raise VoCoDataError(
            f"is {len(shape)}-D with shape {shape}, expected a 3-D {kind} volume or a "
            "4-D one with channels last (I, J, K, C)",
            path,
        )
    if min(shape) < 1:
        raise VoCoDataError(f"has an empty axis: shape {shape}, expected a 3-D {kind}", path)
    dtype = image.header.get_data_dtype()
    if dtype.kind not in "biuf":
        raise VoCoDataError(
            f"has voxel type {dtype} (RGB, complex or other non-scalar data), expected "
            f"one number per voxel for a {kind}",
            path,
        )
    _check_claimed_size(path, image, shape, dtype)
    return image, shape


def _check_claimed_size(path: Path, image, shape: tuple[int, ...], dtype: np.dtype) -> None:
    """Refuse a header whose shape needs more bytes than the file can hold, before
    anything is allocated: nibabel allocates the full claimed size when it reads a
    .nii.gz, so a few corrupt header bytes could ask for gigabytes.

    ``.nii``: the file must hold ``vox_offset + prod(shape) * itemsize`` bytes.
    ``.nii.gz``: that many bytes can be at most :data:`MAX_DEFLATE_RATIO` times the
    compressed file size, and the stream must really inflate to that many
    (:func:`gzip_inflates_to_at_least`: its size field, else a bounded count).
    """
    # where nibabel will start reading: vox_offset, or past the header and extensions
    offset = int(getattr(image.dataobj, "offset", image.header.get_data_offset()))
    needed = offset + math.prod(shape) * dtype.itemsize
    try:
        size = path.stat().st_size
    except OSError as err:
        raise VoCoDataError(f"cannot be read ({err.strerror or err})", path) from err
    claim = f"the header claims shape {shape} of {dtype}"
    if nifti_suffix(path) == ".nii" and needed > size:
        raise VoCoDataError(
            f"is truncated: {claim}, {needed:,} bytes with the header, "
            f"but the file holds {size:,} bytes",
            path,
        )
    if nifti_suffix(path) == ".nii.gz" and needed > MAX_DEFLATE_RATIO * size:
        raise VoCoDataError(
            f"is corrupt or truncated: {claim} ({needed:,} bytes uncompressed), "
            f"more than its {size:,} compressed bytes can hold "
            f"(gzip expands at most {MAX_DEFLATE_RATIO}x)",
            path,
        )
    if nifti_suffix(path) == ".nii.gz":
        inflated = gzip_inflates_to_at_least(path, needed)
        if inflated < needed:
            raise VoCoDataError(
                f"is corrupt or truncated: {claim} ({needed:,} bytes uncompressed), but its "
                f"data inflate to only {inflated:,} bytes", path)


GZIP_CHUNK = 1 << 20
"""Compressed bytes read at a time when counting what a gzip stream inflates to."""


def gzip_inflates_to_at_least(path: Path, needed: int) -> int:
    """How many bytes the gzip file ``path`` inflates to, counted up to ``needed``
    (returns ``needed`` once reached, else the whole, smaller size), without holding
    more than one chunk in memory.

    The gzip trailer's size field (the last member's length modulo 2**32) answers at
    once for an ordinary single-member file of less than 4 GiB; otherwise (several
    members, a larger claim, a trailer that disagrees) the stream is inflated chunk
    by chunk and counted. A corrupt stream counts as ending where it breaks.
    """
    total = 0
    try:
        with open(path, "rb") as file:
            file.seek(-4, os.SEEK_END)
            trailer_size = int.from_bytes(file.read(4), "little")
            if needed < 2**32 and trailer_size >= needed:
                return needed
            file.seek(0)
            inflater = zlib.decompressobj(16 + zlib.MAX_WBITS)
            while total < needed:
                chunk = file.read(GZIP_CHUNK)
                if not chunk:
                    break
                while chunk and total < needed:
                    # bounded output per call: a chunk of zeros may inflate 1000-fold
                    total += len(inflater.decompress(chunk, GZIP_CHUNK))
                    chunk = inflater.unconsumed_tail
                    if inflater.eof:  # the next member starts in what is left
                        rest = inflater.unused_data + chunk
                        inflater = zlib.decompressobj(16 + zlib.MAX_WBITS)
                        chunk = rest
            return min(total, needed)
    except (OSError, zlib.error):
        return min(total, needed)
