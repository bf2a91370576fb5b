"""What both training loops share: stop flag, schedule, mixed precision, RNG state,
process-wide backend settings, memory, the NaN check, the step clock and restoring
a checkpoint's state into fresh objects."""

from __future__ import annotations

import math
import resource
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Protocol

import torch

from voco_core.checkpoint import check_weights
from voco_core.config import RunConfig
from voco_core.errors import VoCoDataError, VoCoError, VoCoTrainingError
from voco_core.memory import release_freed_memory, retain_freed_memory


class StopFlag(Protocol):
    """A cooperative stop request (e.g. ``threading.Event``), checked before every step:
    when set, the trainer writes a checkpoint and ends with a ``stopped`` event."""

    def is_set(self) -> bool: ...


def warmup_cosine(warmup_steps: int, total_steps: int, min_ratio: float) -> Callable[[int], float]:
    """LR factor at optimizer step ``s``: linear warm-up to 1, then cosine to ``min_ratio``."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / (warmup_steps + 1)
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return factor


def amp_dtype(setting: str, device: torch.device) -> torch.dtype | None:
    """``auto``: bf16 on CUDA when supported, else fp16; no AMP on CPU/MPS."""
    if setting == "off" or (setting == "auto" and device.type != "cuda"):
        return None
    if setting == "bf16" or (setting == "auto" and torch.cuda.is_bf16_supported()):
        return torch.bfloat16
    return torch.float16


def autocast(device: torch.device, dtype: torch.dtype | None):
    """``torch.autocast`` to ``dtype``, or a disabled one for full precision."""
    return torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None)


def reset_peak_memory(device: torch.device) -> None:
    """Start a new peak for :func:`peak_memory_bytes`: on CUDA the allocator's peak
    statistics are reset (``torch.cuda.reset_peak_memory_stats``), so a reset at the
    start of each step makes the peak that step's. A no-op elsewhere: the process's peak
    resident set cannot be reset."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory_bytes(device: torch.device) -> int:
    """Peak memory in bytes. On CUDA the peak allocated on ``device`` since the last
    :func:`reset_peak_memory` (the step's peak when the loop resets it every step; since
    the process started otherwise). Elsewhere (CPU, MPS) the process's peak resident set
    since it started, which cannot be reset: it includes earlier steps and runs."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024  # Linux: KiB


def check_finite(loss: torch.Tensor | float, step: int, hint: str) -> None:
    """Stop on a NaN/inf loss before it reaches the weights (the last checkpoint stays).
    A tensor is read to the host here (a sync); pass a float already read to avoid it."""
    value = loss.item() if isinstance(loss, torch.Tensor) else float(loss)
    if not math.isfinite(value):
        raise VoCoTrainingError(f"the loss became {value} at step {step + 1}; the last "
                                f"checkpoint is kept ({hint})")


def require_finite_weights(modules: list[torch.nn.Module | None], step: int,
                           hint: str) -> None:
    """Refuse to save non-finite weights: an update can make them inf or NaN (an absurd
    learning rate) while the loss that led to it was finite. Checked before every
    save, so the checkpoint on disk stays the last good one; the next step's loss is
    NaN anyway and stops the run (:func:`check_finite`)."""
    tensors = [t for module in modules if module is not None
               for t in module.state_dict().values() if t.is_floating_point()]
    if tensors and not bool(torch.stack([torch.isfinite(t).all() for t in tensors]).all()):
        raise VoCoTrainingError(f"the weights became non-finite by step {step}; the last "
                                f"checkpoint is kept ({hint})")


def keep_progress(save: Callable[[], object], step: int, saved_step: int) -> None:
    """On any failure or interruption of a training loop: write the steps completed
    since the last checkpoint (after a NaN too: the check comes before the update, so
    the weights are those of ``step``). Best effort: a failure to save here (a full
    disk, non-finite weights) leaves the last checkpoint as it is, and the loop then
    raises its own error, the one the user needs to see."""
    if step > saved_step and step > 0:
        try:
            save()
        except VoCoError:
            pass


def compile_forward(modules: list[torch.nn.Module | None], run: RunConfig) -> None:
    """``run.compile``: compile each module's forward in place (``nn.Module.compile``
    keeps its parameter names, so checkpoints and restores are unchanged)."""
    if run.compile:
        for module in modules:
            if module is not None:
                module.compile()


def adamw(params, device: torch.device, **options) -> torch.optim.AdamW:
    """``torch.optim.AdamW`` with its fused kernel where torch has one for ``device``
    (CUDA, CPU), else the default implementation. Same maths and state dict, about
    3x faster updates on CPU (``pretrain_bench.py --sections adamw``)."""
    if device.type in ("cuda", "cpu"):
        try:
            return torch.optim.AdamW(params, fused=True, **options)
        except (RuntimeError, ValueError):  # a torch build or dtype without the kernel
            pass
    return torch.optim.AdamW(params, **options)


def rng_state(device: torch.device) -> dict:
    state = {"torch": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def restore_rng(state: dict, device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


@contextmanager
def training_settings(device: torch.device, run: RunConfig) -> Iterator[None]:
    """Process-wide switches for the duration of a run, undone whatever happens (a GUI
    that closes the generator after ``start`` must not keep them).

    cuDNN autotuning on CUDA; or, for bit-reproducible runs (``run.deterministic``),
    deterministic cuDNN, and on CPU no oneDNN and one intra-op thread (with several
    threads, reductions sum in an order that varies with the machine's load). On CPU
    with ``run.cpu_allocator == "retain"``, glibc keeps freed memory for reuse (see
    :mod:`voco_core.memory`).
    """
    previous = {"mkldnn": torch.backends.mkldnn.enabled,
                "cudnn_benchmark": torch.backends.cudnn.benchmark,
                "cudnn_deterministic": torch.backends.cudnn.deterministic,
                "threads": torch.get_num_threads()}
    retained = False
    try:
        if device.type == "cuda":
            torch.backends.cudnn.benchmark = not run.deterministic
            torch.backends.cudnn.deterministic = run.deterministic
        elif run.deterministic:
            torch.backends.mkldnn.enabled = False
            torch.set_num_threads(1)
        retained = (device.type == "cpu" and run.cpu_allocator == "retain"
                    and retain_freed_memory())
        yield
    finally:
        torch.set_num_threads(previous["threads"])
        torch.backends.mkldnn.enabled = previous["mkldnn"]
        torch.backends.cudnn.benchmark = previous["cudnn_benchmark"]
        torch.backends.cudnn.deterministic = previous["cudnn_deterministic"]
        if retained:
            release_freed_memory()


class StepClock:
    """Wall time of each step and the remaining time at a smoothed rate (seconds)."""

    def __init__(self) -> None:
        self.smoothed = math.nan
        self.started = time.perf_counter()

    def start(self) -> None:
        self.started = time.perf_counter()

    def lap(self, steps_left: int) -> tuple[float, float]:
        """(seconds of the step just done, estimated seconds for ``steps_left`` more)."""
        elapsed = time.perf_counter() - self.started
        self.smoothed = elapsed if math.isnan(self.smoothed) else (
            0.8 * self.smoothed + 0.2 * elapsed)
        return elapsed, self.smoothed * steps_left


def restore_state(state: Mapping, source: str | Path, device: torch.device, *,
                  modules: Mapping[str, torch.nn.Module | None],
                  optimizer: torch.optim.Optimizer,
                  scheduler: torch.optim.lr_scheduler.LRScheduler,
                  scaler: torch.amp.GradScaler) -> None:
    """Load a checkpoint's state into freshly built training objects, exactly.

    ``modules`` maps checkpoint entries to modules (``{"student": ..., "teacher": None}``).
    Every weight is checked first, so a checkpoint of another model is one line naming
    ``source`` and the first missing, unexpected or mis-shaped weight; nothing is
    loaded then. The scheduler keeps its own LR functions (they may span more steps).
    """
    for entry, module in modules.items():
        if module is not None:
            check_weights(state[entry], module.state_dict(), source, entry)
    for entry, module in modules.items():
        if module is not None:
            module.load_state_dict(state[entry])
    lr_lambdas = list(getattr(scheduler, "lr_lambdas", []))
    # The saved groups carry the implementation flags of the run that saved them
    # (fused or not): keep this run's, chosen for its device.
    flags = [{k: g.get(k) for k in ("fused", "foreach")} for g in optimizer.param_groups]
    try:
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
    except (ValueError, KeyError, TypeError, RuntimeError) as err:
        raise VoCoDataError(f"checkpoint's optimizer/scheduler state does not fit this model "
                            f"({type(err).__name__}: {str(err).splitlines()[0]})",
                            source) from err
    for group, saved_flags in zip(optimizer.param_groups, flags, strict=False):
        group.update(saved_flags)
    if lr_lambdas:
        scheduler.lr_lambdas[:] = lr_lambdas  # pickled closures are not restored anyway
    if state.get("scaler"):
        scaler.load_state_dict(state["scaler"])
    restore_rng(state["rng"], device)
