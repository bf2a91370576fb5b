"""Take a finetuned segmentation run away: ``voco export RUN --format monai-bundle``.

A MONAI Bundle (https://docs.monai.io/en/stable/mb_specification.html) that runs with
MONAI alone (:mod:`voco_core.export.monai_bundle` says what it reproduces)::

    BUNDLE/configs/metadata.json    MONAI's metadata schema: versions, task, classes,
                                    network_data_format; plus spacing and channels
    BUNDLE/configs/inference.json   pre-processing, sliding windows and the inverse to
                                    the source grid, as MONAI components
    BUNDLE/configs/logging.conf     console logging for ``python -m monai.bundle run``
    BUNDLE/models/model.pt          the SwinUNETR state dict (best.pt, else last.pt)
    BUNDLE/docs/README.md           what it segments, input expectations, how to run it
    BUNDLE/docs/license.txt         the license given at export

The bundle is built in a temporary sibling folder and renamed into place: a failure
leaves nothing under ``out`` but what was there before. An existing non-empty ``out``
is refused (as MONAI's ``init_bundle`` refuses an existing folder) unless
``overwrite`` replaces it; an ``out`` that holds the checkpoint being exported (the
run folder, its ``checkpoints/``) is refused even then: an export never deletes its
own source.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from pathlib import Path

from voco_core.errors import VoCoConfigError, VoCoDataError
from voco_core.export.monai_bundle import (
    ExportResult,
    FinetunedRun,
    bundle_metadata,
    inference_config,
    intensity_text,
    read_finetuned_run,
    write_bundle,
)
from voco_core.outputs import OVERWRITE_FLAG, write_failure
from voco_core.run_folder import RunFolder

EXPORT_FORMATS = ("monai-bundle",)

__all__ = ["EXPORT_FORMATS", "ExportResult", "FinetunedRun", "bundle_metadata", "export_run",
           "inference_config", "intensity_text", "read_finetuned_run",
           "write_bundle"]


def export_run(run: str | Path, out: str | Path, *, format: str = "monai-bundle",
               overwrite: bool = False, authors: str | None = None,
               license: str | None = None) -> ExportResult:
    """Export a finetuned run (folder: its ``best.pt``, else ``last.pt``; or a checkpoint
    file) as ``format`` into ``out``, atomically (see the module doc)."""
    if format not in EXPORT_FORMATS:
        raise VoCoConfigError(f"--format {format!r} is not known: expected "
                              f"{', '.join(EXPORT_FORMATS)}")
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise VoCoDataError("exists and is not a folder; choose a new bundle folder", out)
    finetuned = read_finetuned_run(run)  # bad input fails before anything is written
    if RunFolder(out).contains(finetuned.checkpoint):
        raise VoCoDataError(f"holds the checkpoint being exported ({finetuned.checkpoint}); "
                            "choose a bundle folder outside the run's checkpoints", out)
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise VoCoDataError(f"folder exists and is not empty; choose a new bundle folder, or "
                            f"replace it with {OVERWRITE_FLAG}", out)
    return _build_atomically(out, lambda tmp: write_bundle(tmp, finetuned, authors=authors,
                                                           license=license))


def _build_atomically(out: Path, build: Callable[[Path], ExportResult]) -> ExportResult:
    """``build(tmp)`` in a temporary sibling folder of ``out``, then rename it to ``out``
    (an existing ``out`` is moved aside first and removed after): on any failure
    nothing is left under ``out`` but what was there before."""
    # Named by pid (not tempfile.mkdtemp, whose 0700 mode the bundle would keep): the
    # folder gets the user's umask, as any folder they make.
    tmp = out.parent / f".{out.name}.{os.getpid()}.tmp"
    old = tmp.with_suffix(".old")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)  # a leftover of a killed export
        tmp.mkdir()
    except OSError as err:
        raise VoCoDataError(f"cannot create the bundle folder ({err.strerror or err})",
                            out) from err
    try:
        result = build(tmp)
        if out.exists():
            os.replace(out, old)
            try:
                os.replace(tmp, out)
            except OSError:
                os.replace(old, out)
                raise
        else:
            os.replace(tmp, out)
    except (OSError, RuntimeError) as err:  # torch reports some full disks as RuntimeError
        raise VoCoDataError(f"cannot write the bundle ({write_failure(err, out.parent)})",
                            out) from err
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(old, ignore_errors=True)
    result.path = out
    return result
