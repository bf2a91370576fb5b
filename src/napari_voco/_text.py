"""Text the widgets show: durations, byte counts, learning rates, progress and status."""

from __future__ import annotations

import math
from typing import Any


def format_duration(seconds: float) -> str:
    """``"42 s"``, ``"3 min 05 s"``, ``"2 h 07 min"``; ``"?"`` when not finite."""
    if seconds is None or not math.isfinite(seconds) or seconds < 0:
        return "?"
    seconds = round(seconds)
    if seconds < 60:
        return f"{seconds} s"
    minutes, seconds = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes} min {seconds:02d} s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min"


def format_bytes(count: float) -> str:
    """Binary units: ``"512 B"``, ``"3.2 MiB"``, ``"1.5 GiB"``."""
    count = float(count)
    for unit in ("B", "KiB", "MiB"):
        if abs(count) < 1024:
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1024
    return f"{count:.1f} GiB"


def format_lr(value: float) -> str:
    """A learning rate in scientific notation, ``3.0e-04``."""
    return f"{float(value):.1e}"


def format_dice(value: float | None) -> str:
    """A Dice score with 3 decimals, ``"–"`` when unknown."""
    return "–" if value is None or not math.isfinite(value) else f"{value:.3f}"


def progress_format(step: int, total: int, eta_seconds: float) -> str:
    """The progress bar's text: ``"12 / 40 steps · ETA 1 min 05 s"``."""
    text = f"{step} / {total} steps"
    if step < total and math.isfinite(eta_seconds):
        text += f" · ETA {format_duration(eta_seconds)}"
    return text


def memory_label(device: str | None) -> str:
    """What a step event's ``peak_memory_bytes`` is on the run's ``device``:
    ``"step peak"`` on CUDA (the loops reset the peak every step), ``"peak RSS"``
    elsewhere (the process's peak resident set since it started), ``"peak memory"``
    when the device is unknown (None)."""
    if device is None:
        return "peak memory"
    return "step peak" if str(device).startswith("cuda") else "peak RSS"


def step_status(event: Any, device: str | None = None) -> str:
    """Status line of a training step event: loss, speed (crops/s when the event has
    it), memory (labelled by :func:`memory_label` for the run's ``device``) and
    learning rate."""
    parts = [f"loss {event.loss:.4f}"]
    if math.isfinite(getattr(event, "crops_per_second", math.nan)):
        parts.append(f"{event.crops_per_second:.1f} crops/s")
    if math.isfinite(event.seconds_per_step):
        parts.append(f"{event.seconds_per_step:.2f} s/step")
    if event.peak_memory_bytes:
        parts.append(f"{memory_label(device)} {format_bytes(event.peak_memory_bytes)}")
    if math.isfinite(event.lr):
        parts.append(f"lr {format_lr(event.lr)}")
    return " · ".join(parts)
