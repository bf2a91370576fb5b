"""One run logger for both trainers: JSON lines, optional TensorBoard scalars, and the
run's figure written (atomically) when the run closes; and the two figures."""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from pathlib import Path

import numpy as np

from voco_core.errors import VoCoDataError
from voco_core.outputs import atomic_write, atomic_write_text, json_safe
from voco_core.run_folder import RunFolder, read_log


class RunLogger:
    """Appends records to ``log.jsonl`` (flushed per record) and scalars to TensorBoard.

    Opening it drops records after ``start_step`` left by an earlier run in this folder
    (a resumed run repeats those steps; a new run starts from 0), so the log never holds
    a step twice. ``close`` writes ``figure`` with ``plot(log, figure)``; a figure that
    cannot be written is skipped (the run's checkpoints matter more).
    """

    def __init__(self, folder: RunFolder, *, tag: str, start_step: int, tensorboard: bool,
                 figure: Path, plot: Callable[[Path, Path], Path | None]):
        self.folder, self.tag, self.figure, self.plot = folder, tag, figure, plot
        _keep_records_up_to(folder.log, start_step)
        try:
            self.file = open(folder.log, "a")
        except OSError as err:
            raise VoCoDataError(f"cannot write the run log ({err.strerror or err})",
                                folder.log) from err
        self.writer = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.writer = SummaryWriter(str(folder.tensorboard))
            except ImportError:  # tensorboard not installed: JSON lines only
                self.writer = None

    def write(self, record: Mapping, scalars: Mapping[str, float] = ()) -> None:
        """One JSON line (NaN written as null); ``scalars`` go to TensorBoard at
        ``record["step"]``."""
        try:
            self.file.write(json.dumps(json_safe(dict(record))) + "\n")
            self.file.flush()
        except OSError as err:
            raise VoCoDataError(f"cannot write the run log ({err.strerror or err})",
                                self.folder.log) from err
        if self.writer is not None:
            for key, value in dict(scalars).items():
                self.writer.add_scalar(f"{self.tag}/{key}", value, record["step"])

    def close(self) -> None:
        self.file.close()
        if self.writer is not None:
            self.writer.close()
        try:
            self.plot(self.folder.log, self.figure)
        except (VoCoDataError, OSError, ValueError):
            pass


def _keep_records_up_to(log: Path, step: int) -> None:
    """Rewrite ``log`` without the records of steps after ``step`` (atomically)."""
    if not log.is_file():
        return
    lines = log.read_text().splitlines()
    kept = [line for line in lines if line.strip() and _step_of(line) <= step]
    if len(kept) != len(lines):
        atomic_write_text(log, "".join(line + "\n" for line in kept))


def _step_of(line: str) -> float:
    try:
        return float(json.loads(line).get("step", float("inf")))
    except (ValueError, AttributeError):
        return float("inf")  # a torn last line of a killed run: dropped


def _save_figure(fig, out_png: str | Path) -> Path:
    return atomic_write(out_png, lambda tmp: fig.savefig(tmp, format="png", dpi=90), "figure")


def plot_loss_curve(log_path: str | Path, out_png: str | Path) -> Path | None:
    """Total loss and every logged term (``record["terms"]``, a dict) against step, from
    ``log.jsonl``; a running mean over a tenth of the run smooths each curve."""
    records = [r for r in read_log(log_path) if r.get("loss") is not None]
    if not records:
        return None
    # A bare Figure renders with Agg without touching pyplot's global backend, so this
    # is safe from a worker thread inside napari (matplotlib.use would switch pyplot).
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6, 3.5), constrained_layout=True)
    ax = fig.add_subplot()
    steps = np.array([r["step"] for r in records])
    window = max(1, len(records) // 10)
    ax.plot(steps, [r["loss"] for r in records], color="0.75", lw=0.8, label="total (per step)")
    terms = list(records[-1].get("terms") or {})
    for i, key in enumerate(["loss", *terms]):
        values = np.array([r["loss"] if key == "loss" else (r.get("terms") or {}).get(key)
                           for r in records], dtype=float)  # None -> NaN
        smooth = np.convolve(values, np.ones(window) / window, mode="valid")
        ax.plot(steps[window - 1 :], smooth, color="k" if i == 0 else f"C{i - 1}",
                label=f"{'total' if key == 'loss' else key} ({window}-step mean)")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss")
    ax.set_title("VoCo pretraining")
    ax.legend()
    return _save_figure(fig, out_png)


def plot_finetune_curves(log_path: str | Path, out_png: str | Path) -> Path | None:
    """Training loss and validation mean Dice against step, from ``log.jsonl``."""
    records = read_log(log_path)
    losses = [r for r in records if r.get("loss") is not None]
    dice = [r for r in records if r.get("mean_dice") is not None]
    if not losses:
        return None
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6, 3.2), constrained_layout=True)
    ax = fig.add_subplot()
    ax.plot([r["step"] for r in losses], [r["loss"] for r in losses], "k-", lw=0.8,
            label="DiceCE loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    if dice:
        right = ax.twinx()
        right.plot([r["step"] for r in dice], [r["mean_dice"] for r in dice], "C1o-",
                   label="validation mean Dice")
        right.set_ylabel("Dice")
        right.set_ylim(0, 1)
        right.legend(loc="upper right")
    ax.legend(loc="upper left")
    return _save_figure(fig, out_png)
