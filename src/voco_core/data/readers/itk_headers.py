"""Header-level checks shared by the SimpleITK readers
(:mod:`voco_core.data.readers.itk` for NRRD and MetaImage,
:mod:`voco_core.data.readers.dicom` for DICOM series).

Everything here reads headers only (``ImageFileReader.ReadImageInformation`` and the
header's text fields), so a bad file is refused with one
:class:`~voco_core.errors.VoCoDataError` line before ITK allocates its voxels: a
volume that is not 3-D with one number per voxel, and a NRRD/MetaImage header that
claims more voxel bytes than its data file can hold. ITK's own warnings and C++
exception texts are silenced or shortened to one line (:func:`quiet_itk`,
:func:`itk_reason`).
"""

from __future__ import annotations

import math
import re
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import SimpleITK as sitk

from voco_core.data.readers.nifti import MAX_DEFLATE_RATIO
from voco_core.errors import VoCoDataError

ITEM_BYTES = {
    sitk.sitkUInt8: 1, sitk.sitkInt8: 1, sitk.sitkUInt16: 2, sitk.sitkInt16: 2,
    sitk.sitkUInt32: 4, sitk.sitkInt32: 4, sitk.sitkUInt64: 8, sitk.sitkInt64: 8,
    sitk.sitkFloat32: 4, sitk.sitkFloat64: 8,
}
"""Bytes per voxel of the scalar pixel types a volume may have."""


def header_reader(file: Path, image_io: str, fmt: str, named: Path) -> sitk.ImageFileReader:
    """An :class:`sitk.ImageFileReader` on ``file`` with its header read (no voxels)."""
    reader = sitk.ImageFileReader()
    reader.SetImageIO(image_io)
    reader.SetFileName(str(file))
    try:
        with quiet_itk():
            reader.ReadImageInformation()
    except RuntimeError as err:
        raise VoCoDataError(f"cannot be read as {fmt} ({itk_reason(err)})", named) from err
    return reader


def require_scalar_3d(reader, kind: str, path: Path) -> tuple[int, int, int]:
    """The spatial shape ``(I, J, K)`` of a header, or :class:`VoCoDataError` for an
    image that is not 3-D with one number per voxel.

    Multi-channel hook: a vector pixel (``GetNumberOfComponents() > 1``) or a 4-D
    image with more than one volume is where channels would be accepted, as an
    ``(I, J, K, C)`` channels-last array (``sitk.GetArrayFromImage`` gives
    ``[k, j, i, c]`` for a vector image, ``[c, k, j, i]`` for a 4-D one).
    """
    size = tuple(int(s) for s in reader.GetSize())
    components = int(reader.GetNumberOfComponents())
    if components > 1:
        raise VoCoDataError(
            f"has {components} components per voxel (RGB, vector or multi-channel pixels), "
            f"expected one number per voxel for a 3-D {kind}", path)
    if len(size) == 4 and size[3] == 1:
        size = size[:3]
    if len(size) < 3:
        raise VoCoDataError(f"is {len(size)}-D with size {size}, expected a 3-D {kind} volume",
                            path)
    if len(size) > 3:
        raise VoCoDataError(
            f"is {len(size)}-D with size {size} ({math.prod(size[3:])} channels or time "
            f"points), expected a 3-D {kind} volume or a 4-D image with one channel", path)
    if min(size) < 1:
        raise VoCoDataError(f"has an empty axis: size {size}, expected a 3-D {kind}", path)
    if reader.GetPixelID() not in ITEM_BYTES:
        raise VoCoDataError(
            f"has voxel type {sitk.GetPixelIDValueAsString(reader.GetPixelID())}, expected "
            f"one real number per voxel for a {kind}", path)
    return size  # type: ignore[return-value]


# --------------------------------------------------------------------------- claimed size


def require_nrrd_data_file(path: Path) -> None:
    """A detached NRRD header (``.nhdr``) names its data file: refuse one that is
    missing with a line naming it (ITK's own text is a cut-off chain of teem errors).
    Lists and numbered patterns of data files are left to ITK."""
    text = _header_text(path)
    end = re.search(r"\r?\n\r?\n", text)
    for line in (text[: end.start()] if end else text).splitlines()[1:]:
        key, colon, value = line.partition(":")
        if not colon or line.startswith("#") or key.strip().lower() not in (
                "data file", "datafile"):
            continue
        name = value.strip()
        if name.upper().startswith("LIST") or "%" in name or " " in name:
            return
        data_file = path.parent / name
        if not data_file.is_file():
            raise VoCoDataError(f"its data file {name} (named by the header's 'data file' "
                                f"field) is missing from {data_file.parent.resolve()}", path)
        return


def check_claimed_size(path: Path, fmt: str, needed: int) -> None:
    """Refuse a header claiming more voxel bytes (``needed``) than its data file can
    hold, before ITK allocates them. Reads the header's text fields (encoding,
    data file, header size) only; returns quietly when they cannot be judged
    (bzip2, several data files, an unusual layout)."""
    layout = _nrrd_layout(path) if fmt == "NRRD" else _metaimage_layout(path)
    if layout is None:
        return
    data_file, skip, encoding = layout
    try:
        available = data_file.stat().st_size - skip
    except OSError as err:
        raise VoCoDataError(f"its data file {data_file.name} cannot be read "
                            f"({err.strerror or err})", path) from err
    claim = f"the header claims {needed:,} bytes of voxel data"
    if encoding == "raw" and needed > available:
        raise VoCoDataError(f"is truncated: {claim}, but {data_file.name} holds "
                            f"{max(available, 0):,}", path)
    if encoding == "deflate" and needed > MAX_DEFLATE_RATIO * available:
        raise VoCoDataError(
            f"is corrupt or truncated: {claim}, more than its {max(available, 0):,} "
            f"compressed bytes can hold (gzip expands at most {MAX_DEFLATE_RATIO}x)", path)
    if encoding == "deflate" and fmt == "MetaImage":
        _check_zlib_stream(path, data_file, skip, needed)


def _check_zlib_stream(path: Path, data_file: Path, skip: int, needed: int) -> None:
    """Inflate a compressed MetaImage's zlib stream once, keeping nothing: MetaIO only
    prints a warning to stderr for a damaged or short stream and returns garbage
    voxels, so the stream's checksum and length are checked here first."""
    inflater = zlib.decompressobj()
    inflated = 0
    step = 1 << 22  # bytes of output held at a time
    try:
        with open(data_file, "rb") as file:
            file.seek(skip)
            while not inflater.eof and (chunk := file.read(1 << 20)):
                while chunk and not inflater.eof:
                    inflated += len(inflater.decompress(chunk, step))
                    chunk = inflater.unconsumed_tail
                if inflated > needed:
                    break
    except (OSError, zlib.error) as err:
        raise VoCoDataError(f"is corrupt: its compressed voxel data cannot be inflated "
                            f"({err})", path) from err
    if not inflater.eof or inflated != needed:
        raise VoCoDataError(f"is corrupt or truncated: the header claims {needed:,} bytes of "
                            f"voxel data, its compressed data hold "
                            f"{'at least ' if inflated > needed else ''}{inflated:,}", path)


def _header_text(path: Path, limit: int = 1 << 16) -> str:
    """The first ``limit`` bytes of a header file as text."""
    try:
        with open(path, "rb") as file:
            return file.read(limit).decode("latin-1")
    except OSError as err:
        raise VoCoDataError(f"cannot be read ({err.strerror or err})", path) from err


def _whole_number(text: str | None) -> int | None:
    try:
        return int(text) if text is not None else 0
    except ValueError:
        return None


def _nrrd_layout(path: Path) -> tuple[Path, int, str] | None:
    """``(data file, bytes before the data, "raw" | "deflate")`` of a NRRD header."""
    text = _header_text(path)
    end = re.search(r"\r?\n\r?\n", text)
    fields = {}
    for line in (text[: end.start()] if end else text).splitlines()[1:]:
        if ":" in line and not line.startswith("#") and ":=" not in line:
            key, value = line.split(":", 1)
            fields[key.strip().lower()] = value.strip()
    encoding = {"raw": "raw", "gzip": "deflate", "gz": "deflate"}.get(
        fields.get("encoding", "").lower())
    data_name = fields.get("data file", fields.get("datafile"))
    byte_skip = _whole_number(fields.get("byte skip"))
    if encoding is None or byte_skip is None or byte_skip < 0:
        return None
    if data_name is None:  # attached: the data follow the blank line
        if end is None:
            return None
        return path, len(text[: end.end()].encode("latin-1")), encoding
    if data_name.upper().startswith("LIST") or "%" in data_name or " " in data_name:
        return None
    return path.parent / data_name, byte_skip if encoding == "raw" else 0, encoding


def _metaimage_fields(path: Path) -> tuple[dict[str, str], int]:
    """The ``Key = Value`` fields of a MetaImage header (keys lower case) and its length
    in bytes (up to the end of the ``ElementDataFile`` line, the last field)."""
    text = _header_text(path)
    fields, header_bytes = {}, 0
    for match in re.finditer(r"[^\n]*\n?", text):
        line = match.group()
        if "=" in line:
            key, value = line.split("=", 1)
            fields[key.strip().lower()] = value.strip()
            if key.strip().lower() == "elementdatafile":
                header_bytes = len(text[: match.end()].encode("latin-1"))
                break
    return fields, header_bytes


def require_metaimage_header(path: Path) -> None:
    """MetaIO prints its own parse errors to stderr, so a file that is plainly not a
    MetaImage (no ``NDims``, ``DimSize``, ``ElementType`` and ``ElementDataFile``
    fields) is refused before it is handed to ITK."""
    fields, _ = _metaimage_fields(path)
    missing = [key for key in ("NDims", "DimSize", "ElementType", "ElementDataFile")
               if key.lower() not in fields]
    if missing:
        raise VoCoDataError(f"cannot be read as MetaImage: the header lacks the field(s) "
                            f"{', '.join(missing)}; expected 'Key = Value' lines", path)


def _metaimage_layout(path: Path) -> tuple[Path, int, str] | None:
    """``(data file, bytes before the data, "raw" | "deflate")`` of a MetaImage header."""
    fields, header_bytes = _metaimage_fields(path)
    data_name = fields.get("elementdatafile")
    if data_name is None or "headersize" in fields:
        return None
    encoding = "deflate" if fields.get("compresseddata", "false").lower() == "true" else "raw"
    if data_name.upper() == "LOCAL":
        return path, header_bytes or 0, encoding
    if data_name.upper().startswith("LIST") or "%" in data_name or " " in data_name:
        return None
    return path.parent / data_name, 0, encoding


# --------------------------------------------------------------------------- helpers


@contextmanager
def quiet_itk() -> Iterator[None]:
    """ITK prints warnings (e.g. "Non uniform sampling") to stderr itself; they are
    silenced while reading, the checks here say what is wrong in one line instead."""
    shown = sitk.ProcessObject.GetGlobalWarningDisplay()
    sitk.ProcessObject.SetGlobalWarningDisplay(False)
    try:
        yield
    finally:
        sitk.ProcessObject.SetGlobalWarningDisplay(shown)


def itk_reason(err: BaseException) -> str:
    """An ITK exception's message as one short line, without the C++ source locations."""
    lines = []
    for line in _lines(str(err)):
        line = re.sub(r"^Exception thrown in SimpleITK \w+:\s*", "", line)
        line = re.sub(r"^\S+\.(cxx|h|hxx|cpp):\d+:\s*", "", line)
        line = re.sub(r"^(ITK ERROR|itk::ERROR|sitk::ERROR):\s*(\w+\(0x[0-9a-fA-F]+\):\s*)?",
                      "", line)
        if line:
            lines.append(line)
    reason = " ".join(lines) or type(err).__name__
    return reason if len(reason) <= 300 else reason[:297] + "..."


def _lines(text: str) -> Iterator[str]:
    for line in text.splitlines():
        line = line.strip()
        if line:
            yield line
