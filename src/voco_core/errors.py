"""Typed errors raised for bad input.

Every message names the file or parameter at fault and says what was expected,
so the CLI can print it as one line and the GUI as one notification.
"""

from __future__ import annotations

from pathlib import Path


class VoCoError(Exception):
    """Base class of every error this project raises on purpose."""


class VoCoDataError(VoCoError, ValueError):
    """A data file or datalist is missing, unreadable or not what was expected.

    ``path`` is the offending file (or folder), when there is one.
    """

    def __init__(self, message: str, path: str | Path | None = None):
        self.path = Path(path) if path is not None else None
        super().__init__(f"{path}: {message}" if path is not None else message)


class VoCoConfigError(VoCoError, ValueError):
    """A configuration value (file field or CLI flag) is invalid."""


class VoCoTrainingError(VoCoError, RuntimeError):
    """Training cannot go on (e.g. the loss became NaN); the last checkpoint is kept."""


class ExistingRunError(VoCoDataError):
    """A new run was asked for in a folder that already holds a run: nothing is
    written. ``path`` is that folder; callers word the ways on (CLI: ``--resume`` or
    another ``--out``; the GUI: *Resume from* or another output folder)."""
