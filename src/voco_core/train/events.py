"""Progress records of both training loops.

The trainers are generators of events: one ``start``, one ``step`` per optimizer
step, finetuning's ``validation`` after each validation, and a last ``stopped``
(stop flag honoured, checkpoint written) or ``done``. The CLI turns them into a
progress bar, the napari plugin into a progress bar and live plots; the run
logger writes them to ``log.jsonl``.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass
class TrainEvent:
    """Fields both trainers report.

    ``loss`` and ``lr`` are NaN before the first step. ``seconds_per_step`` is the
    last step's wall time, ``eta_seconds`` the remaining steps at a smoothed rate.
    ``peak_memory_bytes``: CUDA peak allocated during the step on a GPU (the trainers
    reset the peak before each step), the process's peak resident
    set on CPU. ``checkpoint`` is the file written at this event, if any.
    """

    kind: str  # "start" | "step" | "validation" (finetuning) | "stopped" | "done"
    step: int
    total_steps: int
    loss: float = math.nan
    lr: float = math.nan
    seconds_per_step: float = math.nan
    eta_seconds: float = math.nan
    peak_memory_bytes: int = 0
    checkpoint: str | None = None
    run_dir: str = ""
    message: str = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class PretrainEvent(TrainEvent):
    """A pretraining record: ``terms`` are the loss terms by name (v1: ``pos``, ``neg``,
    ``reg``; v2: ``intra``, ``inter``, ``reg``), each averaged over the step's
    micro-batches (and ranks); ``crops_per_second`` counts every crop of every rank.
    A ``step``'s ``message`` holds what pre-processing reported about the volumes
    first loaded for it (``intensity: auto`` choices, a foreground crop that kept the
    whole volume), one note per line; usually empty."""

    terms: dict[str, float] = field(default_factory=dict)
    crops_per_second: float = math.nan


@dataclass
class FinetuneEvent(TrainEvent):
    """A finetuning record: Dice over foreground classes, NaN until the first
    validation; ``class_dice`` maps class name to Dice (None where a class is absent
    from every validation case); ``best_checkpoint`` is ``best.pt`` once written.
    ``message`` carries, on ``start``, the pretrained-weights load report and what
    pre-processing reported about the volumes (one note per line)."""

    mean_dice: float = math.nan
    class_dice: dict[str, float | None] = field(default_factory=dict)
    best_dice: float = math.nan
    best_step: int = -1
    best_checkpoint: str | None = None


def finite_or_none(value: float) -> float | None:
    """JSON-safe number: NaN/inf -> None (JSON has no NaN)."""
    value = float(value)
    return value if math.isfinite(value) else None
