"""Checkpoint files: atomic writes, safe loads.

Checkpoints hold only tensors and plain types (dicts, lists, numbers, strings),
so they load with ``torch.load(..., weights_only=True)``: a file that would need
arbitrary pickle code to load is refused, never executed (checkpoints are
downloaded files, i.e. untrusted).
"""

from __future__ import annotations

import json
import math
import os
import pickle
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from voco_core import __version__
from voco_core.errors import VoCoDataError

CHECKPOINT_NAME = "last.pt"
BEST_NAME = "best.pt"
PRETRAIN_FORMAT = "napari-voco/pretrain"
SEGMENTATION_FORMAT = "napari-voco/segmentation"

# Entries a checkpoint must hold to resume from it (checked before anything is loaded,
# so a damaged file is one line naming the missing entry, not a KeyError).
PRETRAIN_RESUME_KEYS = ("step", "samples_seen", "config", "student", "teacher", "optimizer",
                        "scheduler", "rng")
SEGMENTATION_KEYS = ("kind", "step", "config", "model", "best_dice", "best_step")
SEGMENTATION_RESUME_KEYS = (*SEGMENTATION_KEYS, "optimizer", "scheduler", "rng")


def pretrain_payload(*, step: int, samples_seen: int, world_size: int, config: dict,
                     student: dict, teacher: dict | None, optimizer: dict, scheduler: dict,
                     scaler: dict | None, rng: dict) -> dict[str, Any]:
    """A pretraining ``last.pt``: everything :func:`iter_pretrain` needs to resume exactly
    (``samples_seen``: volumes drawn by all ranks together, the data stream's position)."""
    return {"format": PRETRAIN_FORMAT, "voco_version": __version__, "step": step,
            "samples_seen": samples_seen, "world_size": world_size, "config": config,
            "student": student, "teacher": teacher, "optimizer": optimizer,
            "scheduler": scheduler, "scaler": scaler, "rng": rng}


def segmentation_payload(kind: str, *, step: int, config: dict, model: dict,
                         best_dice: float, best_step: int, optimizer: dict | None = None,
                         scheduler: dict | None = None, scaler: dict | None = None,
                         rng: dict | None = None) -> dict[str, Any]:
    """A finetuning checkpoint: ``best`` (model + config, what inference needs) or ``last``
    (also optimizer, scheduler, scaler and RNG state, to resume)."""
    payload = {"format": SEGMENTATION_FORMAT, "kind": kind, "voco_version": __version__,
               "step": step, "config": config, "model": model, "best_dice": best_dice,
               "best_step": best_step}
    if kind == "last":
        payload.update(optimizer=optimizer, scheduler=scheduler, scaler=scaler, rng=rng)
    return payload


def require_keys(state: dict, keys: tuple[str, ...], path: str | Path) -> None:
    """Refuse a checkpoint that lacks one of ``keys`` (a damaged or hand-made file)."""
    missing = [key for key in keys if key not in state]
    if missing:
        raise VoCoDataError(f"checkpoint is incomplete: entry {missing[0]!r} is missing "
                            f"(expected {', '.join(keys)})", path)


def _temporary(path: Path) -> Path:
    """``.NAME.<pid>.tmp`` beside ``path``: same file system (atomic rename), and
    recognisable as a leftover by :meth:`RunFolder.remove_stale_temporaries`."""
    return path.with_name(f".{path.name}.{os.getpid()}.tmp")


def atomic_write(path: str | Path, write: Callable[[Path], object], what: str = "file"
                 ) -> Path:
    """``write(tmp)`` to a temporary file in the same folder, then ``os.replace``: a
    crash or a full disk never leaves a half-written file under ``path`` (the previous
    one stays). Failures are one :class:`VoCoDataError` naming ``path``."""
    path = Path(path)
    tmp = _temporary(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write(tmp)
        os.replace(tmp, path)
    except (OSError, RuntimeError) as err:
        # torch.save reports a full disk as RuntimeError ("PytorchStreamWriter failed
        # writing file ..."), not OSError.
        reason = err.strerror if isinstance(err, OSError) and err.strerror else (
            str(err).splitlines()[0] if str(err) else type(err).__name__)
        raise VoCoDataError(f"cannot write {what} ({reason})", path) from err
    finally:
        tmp.unlink(missing_ok=True)
    return path


def atomic_torch_save(obj: Any, path: str | Path) -> Path:
    """``torch.save`` through :func:`atomic_write`."""
    return atomic_write(path, lambda tmp: torch.save(obj, tmp), "checkpoint")


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


def find_checkpoint(path: str | Path) -> Path:
    """A checkpoint file, or a run folder holding ``checkpoints/last.pt``."""
    path = Path(path)
    if path.is_dir():
        candidate = path / "checkpoints" / CHECKPOINT_NAME
        if not candidate.is_file():
            raise VoCoDataError(f"no checkpoint in this run folder (expected {candidate})", path)
        return candidate
    if not path.is_file():
        raise VoCoDataError("checkpoint or run folder not found", path)
    return path


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict:
    """Load a checkpoint safely (``weights_only=True``); typed errors name the file."""
    path = find_checkpoint(path)
    with open(path, "rb") as file:
        head = file.read(2)
    # torch.save writes a zip archive; very old torch wrote a bare pickle (b"\x80").
    if not zipfile.is_zipfile(path) and head[:1] != b"\x80":
        raise VoCoDataError("not a readable PyTorch checkpoint (not torch.save's format)", path)
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        raise VoCoDataError(
            "refused: loading it would execute arbitrary pickled code; only checkpoints made "
            "of tensors and plain values (dicts, lists, numbers, strings) are accepted",
            path,
        ) from err
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError) as err:
        raise VoCoDataError(
            f"not a readable PyTorch checkpoint (truncated or corrupt: {type(err).__name__})", path
        ) from err
    if not isinstance(state, dict):
        raise VoCoDataError(f"checkpoint holds a {type(state).__name__}, expected a dict", path)
    return state


def load_pretrain_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict:
    """:func:`load_checkpoint`, refusing files that are not this project's pretraining runs."""
    state = load_checkpoint(path, map_location=map_location)
    if state.get("format") != PRETRAIN_FORMAT:
        hint = (" (a finetuned segmentation model: use it with 'voco predict')"
                if state.get("format") == SEGMENTATION_FORMAT else "")
        raise VoCoDataError(f"not a napari-voco pretraining checkpoint (format "
                            f"{state.get('format')!r}){hint}", path)
    return state


def find_segmentation_checkpoint(path: str | Path) -> Path:
    """The finetuning checkpoint a path names: a run folder's ``best.pt``, else its
    ``last.pt``; or the file itself (typed error when neither exists)."""
    path = Path(path)
    if path.is_dir():
        for name in (BEST_NAME, CHECKPOINT_NAME):
            if (path / "checkpoints" / name).is_file():
                return path / "checkpoints" / name
    return find_checkpoint(path)


def load_segmentation_checkpoint(path: str | Path,
                                 map_location: str | torch.device = "cpu") -> dict:
    """A finetuning checkpoint: a run folder (its ``best.pt``, else ``last.pt``) or a file."""
    path = find_segmentation_checkpoint(path)
    state = load_checkpoint(path, map_location=map_location)
    if state.get("format") != SEGMENTATION_FORMAT:
        hint = (" (a pretraining checkpoint: pass it as the pretrained backbone to "
                "'voco finetune --pretrained')"
                if state.get("format") == PRETRAIN_FORMAT else "")
        raise VoCoDataError(f"not a napari-voco segmentation checkpoint (format "
                            f"{state.get('format')!r}){hint}", path)
    return state
