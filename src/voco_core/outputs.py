"""Writing what a command produces: one rule for existing outputs, atomic writes, and
write failures said plainly.

- :func:`refuse_existing`: an output file that already exists is refused (one line
  naming it and the ``--overwrite`` flag) unless the caller was asked to overwrite;
  ``voco predict``, ``positions``, ``export`` and ``make-phantoms`` all check every
  output before writing the first. Run folders have their own rule
  (:func:`voco_core.plan.claim_run_folder`).
- :func:`atomic_write`: a temporary file beside the target, then ``os.replace``: a
  crash or a full disk never leaves a half-written file under the target's name.
- :func:`write_failure`: why a write failed, in words (``no space left on device``
  rather than the storage library's internal assertion).
"""

from __future__ import annotations

import errno
import json
import math
import os
import shutil
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from voco_core.errors import VoCoDataError

OVERWRITE_FLAG = "--overwrite"
"""The one flag name that lets a command replace its existing outputs."""


def refuse_existing(paths: Iterable[str | Path], overwrite: bool) -> None:
    """Raise :class:`VoCoDataError` naming the first of ``paths`` that exists (and how
    many more do), unless ``overwrite``. Nothing is written either way."""
    existing = [Path(p) for p in paths if Path(p).exists()]
    if existing and not overwrite:
        more = f" (and {len(existing) - 1} more of this command's outputs)" if len(
            existing) > 1 else ""
        raise VoCoDataError(f"exists{more}; choose another --out, or pass {OVERWRITE_FLAG} "
                            "to replace it", existing[0])


LOW_SPACE_BYTES = 1 << 20
"""Free bytes under which a failed write is put down to a full disk (a library such
as torch's zip writer reports ENOSPC as an internal assertion on a short write)."""


def write_failure(err: BaseException, folder: Path | None = None) -> str:
    """A short reason for a failed write into ``folder``: the OS's words for an OSError
    (``No space left on device``); ``No space left on device`` too when the folder's
    file system has less than :data:`LOW_SPACE_BYTES` free; else the first line of
    the message."""
    if isinstance(err, OSError) and err.strerror:
        return err.strerror
    if folder is not None:
        try:
            if shutil.disk_usage(folder).free < LOW_SPACE_BYTES:
                return os.strerror(errno.ENOSPC)
        except OSError:
            pass
    return str(err).splitlines()[0] if str(err) else type(err).__name__


def temporary_path(path: Path) -> Path:
    """``.NAME.<pid>.tmp`` beside ``path``: same file system (atomic rename), and
    recognisable as a leftover by
    :meth:`~voco_core.run_folder.RunFolder.remove_stale_temporaries`."""
    return path.with_name(f".{path.name}.{os.getpid()}.tmp")


def atomic_write(path: str | Path, write: Callable[[Path], object], what: str = "file"
                 ) -> Path:
    """``write(tmp)`` to a temporary file in the same folder, then ``os.replace``: a
    crash or a full disk never leaves a half-written file under ``path`` (the previous
    one stays). Failures are one :class:`VoCoDataError` naming ``path``."""
    path = Path(path)
    tmp = temporary_path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write(tmp)
        os.replace(tmp, path)
    except (OSError, RuntimeError) as err:
        raise VoCoDataError(f"cannot write {what} ({write_failure(err, path.parent)})",
                            path) from err
    finally:
        tmp.unlink(missing_ok=True)
    return path


def write_through_file(save: Callable[[Any], object]) -> Callable[[Path], None]:
    """A ``write(tmp)`` for :func:`atomic_write` that hands ``save`` an open binary file
    rather than a path: a library writing to a path (``torch.save``) reports a full
    disk as an internal assertion, while Python's file reports ``ENOSPC``."""

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as file:
            save(file)
            file.flush()
            os.fsync(file.fileno())

    return write


def atomic_write_text(path: str | Path, text: str) -> Path:
    return atomic_write(path, lambda tmp: tmp.write_text(text))


def write_json(path: str | Path, value: Any) -> Path:
    """Plain JSON, atomically; NaN and infinities are written as null (JSON has none)."""
    return atomic_write_text(path, json.dumps(json_safe(value), indent=2, allow_nan=False)
                             + "\n")


def json_safe(value: Any) -> Any:
    """``value`` with every non-finite float (nested in dicts, lists) replaced by None."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {key: json_safe(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [json_safe(item) for item in value]
    return value
