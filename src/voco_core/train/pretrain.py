"""VoCo pretraining: one loop, read top to bottom.

:func:`iter_pretrain` is a generator of :class:`PretrainEvent` records (one per
optimizer step, plus start and end), which the CLI turns into a progress bar and
the napari plugin into a progress bar and a live plot. :func:`pretrain` drives it
with an optional callback. A cooperative ``stop`` flag (anything with
``is_set()``, e.g. ``threading.Event``) is checked before every step; stopping
writes a checkpoint first.

Run folder::

    RUN_DIR/config.yaml          the full config of the run
    RUN_DIR/checkpoints/last.pt  student, teacher, optimizer, scheduler, scaler,
                                 step, config, sampler and RNG states
    RUN_DIR/meta.json            step, loss, time of the last checkpoint (plain JSON)
    RUN_DIR/log.jsonl            one JSON record per logged step
    RUN_DIR/tensorboard/         the same scalars for TensorBoard
    RUN_DIR/loss.png             loss curves, written when the run ends or stops
"""

from __future__ import annotations

import json
import math
import resource
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import nullcontext
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Literal, Protocol

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel

from voco_core import __version__
from voco_core.checkpoint import (
    CHECKPOINT_NAME,
    PRETRAIN_FORMAT,
    atomic_torch_save,
    load_pretrain_checkpoint,
    write_json,
)
from voco_core.config import VoCoConfig, config_from_dict, resolve_device
from voco_core.data.io import DatalistEntry, check_volume_header, load_datalist
from voco_core.data.sampling import (
    LoadFailure,
    PretrainDataset,
    ResumableRandomSampler,
    VoCoBatch,
    VoCoCropSampler,
    collate_list,
    min_raw_shape,
)
from voco_core.distributed import (
    any_rank,
    gather_strings,
    mean_over_ranks,
    setup_distributed,
    teardown_distributed,
    weights_digest,
)
from voco_core.errors import VoCoConfigError, VoCoDataError, VoCoError
from voco_core.losses import VoCoLoss
from voco_core.memory import release_freed_memory, retain_freed_memory
from voco_core.models import VoCoModel

CHECKPOINT_FORMAT = PRETRAIN_FORMAT


class StopFlag(Protocol):
    def is_set(self) -> bool: ...


class VoCoTrainingError(VoCoError, RuntimeError):
    """Training cannot go on (e.g. the loss became NaN)."""


@dataclass
class PretrainEvent:
    """One progress record.

    ``kind``: ``start`` (before the first step), ``step`` (after each optimizer
    step), ``stopped`` (stop flag honoured, checkpoint written) or ``done``.
    Loss terms are NaN before the first step. ``checkpoint`` is the file written
    at this step, if any. Memory is bytes: CUDA peak allocated on a GPU, the
    process's peak resident set on CPU.
    """

    kind: Literal["start", "step", "stopped", "done"]
    step: int
    total_steps: int
    loss: float = math.nan
    pos: float = math.nan
    neg: float = math.nan
    reg: float = math.nan
    lr: float = math.nan
    seconds_per_step: float = math.nan
    crops_per_second: float = math.nan
    eta_seconds: float = math.nan
    peak_memory_bytes: int = 0
    checkpoint: str | None = None
    run_dir: str = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class PretrainResult:
    run_dir: Path
    checkpoint: Path
    step: int
    stopped: bool
    history: list[PretrainEvent]


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


def peak_memory_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024  # Linux: KiB


def voco_loss_on_batch(model: Callable, loss_fn: VoCoLoss, batch: VoCoBatch) -> dict:
    """One forward of all ``B * (K + m)`` crops, split back into bases and sub-volumes.

    ``model`` is a :class:`VoCoModel` (or its DDP wrapper): crops -> (student, teacher).
    """
    b, k, m = batch.base_crops.shape[0], batch.base_crops.shape[1], batch.random_crops.shape[1]
    crops = torch.cat([batch.base_crops.flatten(0, 1), batch.random_crops.flatten(0, 1)])
    student, teacher = model(crops)

    def split(features):
        if features is None:
            return None, None
        return features[: b * k].view(b, k, -1), features[b * k :].view(b, m, -1)

    (s_bases, s_crops), (t_bases, t_crops) = split(student), split(teacher)
    return loss_fn(s_crops, t_crops, s_bases, t_bases, batch.labels)


def check_dataset(entries: Sequence[DatalistEntry], config: VoCoConfig) -> None:
    """Header-level pre-flight of every volume (fast; voxel data is checked on load)."""
    for entry in entries:
        check_volume_header(entry.image, min_shape=min_raw_shape(config))


def _rng_state(device: torch.device) -> dict:
    state = {"torch": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _restore_rng(state: dict, device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def _set_backend_flags(device: torch.device, deterministic: bool) -> dict:
    """cuDNN autotuning on CUDA; or, for bit-reproducible runs, deterministic cuDNN, and
    on CPU no oneDNN and one intra-op thread (measured: with 2 threads, multi-threaded
    reductions still differed run to run by ~1e-6 when the machine was busy). Returns
    the previous values for :func:`_restore_backend_flags`."""
    previous = {"mkldnn": torch.backends.mkldnn.enabled,
                "cudnn_benchmark": torch.backends.cudnn.benchmark,
                "cudnn_deterministic": torch.backends.cudnn.deterministic,
                "threads": torch.get_num_threads()}
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = not deterministic
        torch.backends.cudnn.deterministic = deterministic
    elif deterministic:
        torch.backends.mkldnn.enabled = False
        torch.set_num_threads(1)
    return previous


def _restore_backend_flags(previous: dict) -> None:
    torch.set_num_threads(previous["threads"])
    torch.backends.mkldnn.enabled = previous["mkldnn"]
    torch.backends.cudnn.benchmark = previous["cudnn_benchmark"]
    torch.backends.cudnn.deterministic = previous["cudnn_deterministic"]


def iter_pretrain(
    config: VoCoConfig,
    data: str | Path | Sequence[DatalistEntry],
    run_dir: str | Path | None = None,
    *,
    resume: str | Path | None = None,
    stop: StopFlag | None = None,
) -> Iterator[PretrainEvent]:
    """Pretrain, yielding a :class:`PretrainEvent` per optimizer step.

    Under ``torchrun`` (or with a process group already initialised) this is one
    DDP rank: every rank yields events with the loss averaged over ranks; only
    rank 0 writes checkpoints and logs.

    Args:
        config: the run's configuration (validated). When resuming, pass the
            checkpoint's config (see :func:`resume_config`); ``optim.total_steps``
            may be raised to train longer, ``optim.batch_size``/``grad_accum`` and
            the world size may change.
        data: a folder, a Decathlon JSON, or datalist entries.
        run_dir: output folder (default ``config.run.output_dir``).
        resume: a run folder or checkpoint to continue from (exactly: model,
            teacher, optimizer, scheduler, scaler, step, data position, RNG state).
        stop: checked before every step; when set (on any rank), a checkpoint is
            written and the generator ends with a ``stopped`` event.
    """
    config.validate()
    dist_ctx, device = setup_distributed(resolve_device(config.run.device))
    run_dir = Path(run_dir or config.run.output_dir)
    entries = list(data) if not isinstance(data, str | Path) else load_datalist(data)
    check_dataset(entries, config)
    if dist_ctx.is_main:
        try:
            (run_dir / "checkpoints").mkdir(parents=True, exist_ok=True)
            config.save(run_dir / "config.yaml")
        except OSError as err:
            raise VoCoDataError(f"output folder is not writable ({err.strerror or err})",
                                run_dir) from err

    o, seed = config.optim, config.run.seed
    torch.manual_seed(seed)
    model = VoCoModel(config.model).to(device)
    loss_fn = VoCoLoss(config.loss.pos_weight, config.loss.neg_weight, config.loss.reg_weight)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=o.lr, weight_decay=o.weight_decay, amsgrad=o.amsgrad)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, warmup_cosine(o.warmup_steps, o.total_steps, o.min_lr / o.lr))
    dtype = amp_dtype(o.amp, device)
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    step, samples_seen = 0, 0  # samples_seen: volumes drawn by all ranks together
    if resume is not None:
        state = load_pretrain_checkpoint(resume, map_location=device)
        _check_resumable(state, config, resume)
        model.student.load_state_dict(state["student"])
        if model.teacher is not None:
            model.teacher.load_state_dict(state["teacher"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        scheduler.lr_lambdas[0] = warmup_cosine(o.warmup_steps, o.total_steps, o.min_lr / o.lr)
        if state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
        _restore_rng(state["rng"], device)
        step, samples_seen = int(state["step"]), int(state["samples_seen"])
    # DDP over the whole model: only the student's parameters require gradients;
    # the teacher follows from identical students, so it stays identical too.
    forward = model
    if dist_ctx.active:
        forward = DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None,
            broadcast_buffers=False)  # the only buffers are constant index tables

    volumes_per_rank_step = o.batch_size * o.grad_accum
    # Each rank takes every world_size-th index of one shuffled stream, from where
    # all ranks together had got to (so resuming on another world size works).
    data_order = ResumableRandomSampler(len(entries), seed,
                                        start=samples_seen // dist_ctx.world_size,
                                        rank=dist_ctx.rank, world_size=dist_ctx.world_size)
    loader = torch.utils.data.DataLoader(
        PretrainDataset(entries, config),
        batch_size=o.batch_size,
        sampler=data_order,
        num_workers=config.data.num_workers,
        collate_fn=collate_list,
        pin_memory=config.data.pin_memory and device.type == "cuda",
        persistent_workers=config.data.num_workers > 0,
    )
    batches = iter(loader)
    sampler = VoCoCropSampler(config)
    logger = _RunLogger(run_dir, config) if dist_ctx.is_main else None
    crops_per_step = (volumes_per_rank_step * dist_ctx.world_size
                      * (config.num_base_crops + config.geometry.num_random_crops))
    checkpoint_path = run_dir / "checkpoints" / CHECKPOINT_NAME

    def save(check_ranks: bool = True) -> Path:
        digests = None
        if dist_ctx.active and check_ranks:  # a collective: every rank saves at the same step
            modules = [m for m in (model.student, model.teacher) if m is not None]
            digests = gather_strings(weights_digest(*modules), dist_ctx)
            if len(set(digests)) != 1:
                raise VoCoTrainingError(f"DDP ranks hold different weights at step {step}")
        if not dist_ctx.is_main:
            return checkpoint_path
        atomic_torch_save({
            "format": CHECKPOINT_FORMAT,
            "voco_version": __version__,
            "step": step,
            "samples_seen": samples_seen,
            "world_size": dist_ctx.world_size,
            "config": config.to_dict(),
            "student": model.student.state_dict(),
            "teacher": model.teacher.state_dict() if model.teacher is not None else None,
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "scaler": scaler.state_dict() if scaler.is_enabled() else None,
            "rng": _rng_state(device),
        }, checkpoint_path)
        write_json(run_dir / "meta.json", {
            "format": CHECKPOINT_FORMAT, "voco_version": __version__, "step": step,
            "total_steps": o.total_steps, "checkpoint": f"checkpoints/{CHECKPOINT_NAME}",
            "preset": config.preset, "teacher": config.model.teacher,
            "world_size": dist_ctx.world_size, "rank_weight_digests": digests,
            "loss": last.loss, "saved_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        })
        return checkpoint_path

    last = PretrainEvent("start", step, o.total_steps, run_dir=str(run_dir))
    saved_step = step if resume is not None else -1
    seconds_per_step = math.nan
    # Process-wide switches last, right before the try whose finally undoes them: an
    # error while setting up, or a consumer closing the generator after "start", must
    # not leave oneDNN off or one thread in the caller's process (e.g. napari).
    retained = device.type == "cpu" and config.run.cpu_allocator == "retain" and (
        retain_freed_memory())
    backend_flags = _set_backend_flags(device, config.run.deterministic)
    try:
        yield last
        while step < o.total_steps:
            if any_rank(stop is not None and stop.is_set(), dist_ctx, device):
                if saved_step != step:
                    save()
                    saved_step = step
                last = replace(last, kind="stopped", checkpoint=str(checkpoint_path))
                yield last
                return
            started = time.perf_counter()
            model.train()
            optimizer.zero_grad(set_to_none=True)
            totals = [0.0, 0.0, 0.0, 0.0]  # total, pos, neg, reg
            for micro in range(o.grad_accum):
                volumes = next(batches)
                for item in volumes:
                    if isinstance(item, LoadFailure):
                        raise VoCoDataError(item.message)
                # One generator per volume, from (seed, step, global volume index): the
                # same crops whichever rank or micro-batch draws the volume.
                first = (micro * dist_ctx.world_size + dist_ctx.rank) * o.batch_size
                rngs = [np.random.default_rng([seed, step, first + b]) for b in range(len(volumes))]
                batch = sampler([v.to(device, non_blocking=True) for v in volumes], rngs)
                # All-reduce gradients once per optimizer step, not per micro-batch.
                sync = (nullcontext() if not dist_ctx.active or micro == o.grad_accum - 1
                        else forward.no_sync())
                with sync:
                    with torch.autocast(device.type, dtype=dtype or torch.float32,
                                        enabled=dtype is not None):
                        terms = voco_loss_on_batch(forward, loss_fn, batch)
                    if not torch.isfinite(terms["total"]):
                        raise VoCoTrainingError(
                            f"the loss became {terms['total'].item()} at step {step + 1}; the "
                            "last checkpoint is kept (try a lower optim.lr or optim.amp=off)")
                    scaler.scale(terms["total"] / o.grad_accum).backward()
                for i, key in enumerate(("total", "pos", "neg", "reg")):
                    totals[i] += terms[key].item() / o.grad_accum
            if o.clip_norm > 0:
                scaler.unscale_(optimizer)  # clip the true gradients, also under fp16
                torch.nn.utils.clip_grad_norm_(params, o.clip_norm)
            scaler.step(optimizer)
            scaler.update()
            scheduler.step()
            model.update_teacher()
            step += 1
            samples_seen += volumes_per_rank_step * dist_ctx.world_size
            loss, pos, neg, reg = mean_over_ranks(totals, dist_ctx, device)

            elapsed = time.perf_counter() - started
            seconds_per_step = elapsed if math.isnan(seconds_per_step) else (
                0.8 * seconds_per_step + 0.2 * elapsed)
            checkpoint = None
            if step % config.run.checkpoint_every == 0 or step == o.total_steps:
                checkpoint = str(save())
                saved_step = step
            last = PretrainEvent(
                "step", step, o.total_steps, loss=loss, pos=pos, neg=neg, reg=reg,
                lr=optimizer.param_groups[0]["lr"], seconds_per_step=elapsed,
                crops_per_second=crops_per_step / elapsed,
                eta_seconds=seconds_per_step * (o.total_steps - step),
                peak_memory_bytes=peak_memory_bytes(device), checkpoint=checkpoint,
                run_dir=str(run_dir),
            )
            if logger is not None:
                logger.log(last)
            yield last
        last = replace(last, kind="done")
        yield last
    except BaseException:
        if step > saved_step and step > 0:
            try:  # keep the progress made so far (not after a NaN: weights are unchanged)
                save(check_ranks=False)  # other ranks may not be here: no collective
            except VoCoError:
                pass
        raise
    finally:
        if logger is not None:
            logger.close()
        del batches, loader
        teardown_distributed(dist_ctx)
        _restore_backend_flags(backend_flags)
        if retained:
            release_freed_memory()


def _check_resumable(state: dict, config: VoCoConfig, source: str | Path) -> None:
    saved = config_from_dict(state["config"], check_device=False)
    if saved.model != config.model or saved.geometry != config.geometry:
        raise VoCoConfigError(
            f"{source}: the checkpoint's model/geometry differ from the config; resume with "
            "the run's own config (resume_config)")


def run_folder_of(resume: str | Path) -> Path | None:
    """The run folder a resume target belongs to: the folder itself, or
    ``RUN_DIR`` for ``RUN_DIR/checkpoints/*.pt``; None for a loose checkpoint file."""
    resume = Path(resume)
    if resume.is_dir():
        return resume
    if resume.parent.name == "checkpoints":
        return resume.parent.parent
    return None


def resume_config(resume: str | Path, **overrides: Any) -> VoCoConfig:
    """The config stored in a run's checkpoint, with ``section.field`` overrides
    (e.g. ``{"optim": {"total_steps": 200}, "run": {"device": "cpu"}}``)."""
    from voco_core.config import merge

    state = load_pretrain_checkpoint(resume)
    return config_from_dict(merge(state["config"], overrides))


def pretrain(
    config: VoCoConfig,
    data: str | Path | Sequence[DatalistEntry],
    run_dir: str | Path | None = None,
    *,
    resume: str | Path | None = None,
    stop: StopFlag | None = None,
    callback: Callable[[PretrainEvent], None] | None = None,
) -> PretrainResult:
    """Run :func:`iter_pretrain` to the end; ``callback`` receives every event."""
    history: list[PretrainEvent] = []
    for event in iter_pretrain(config, data, run_dir, resume=resume, stop=stop):
        history.append(event)
        if callback is not None:
            callback(event)
    final = history[-1]
    return PretrainResult(Path(final.run_dir), Path(final.run_dir) / "checkpoints" /
                          CHECKPOINT_NAME, final.step, final.kind == "stopped", history)


class _RunLogger:
    """JSON lines + TensorBoard scalars every ``log_every`` steps; loss.png at close."""

    def __init__(self, run_dir: Path, config: VoCoConfig):
        self.run_dir, self.every = run_dir, config.run.log_every
        self.file = open(run_dir / "log.jsonl", "a")
        self.writer = None
        if config.run.tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.writer = SummaryWriter(str(run_dir / "tensorboard"))
            except ImportError:  # tensorboard not installed: JSON lines only
                self.writer = None

    def log(self, event: PretrainEvent) -> None:
        if event.step % self.every and event.step != event.total_steps:
            return
        record = {k: v for k, v in event.to_dict().items() if k not in ("kind", "run_dir")}
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        if self.writer is not None:
            for key in ("loss", "pos", "neg", "reg", "lr", "crops_per_second"):
                self.writer.add_scalar(f"pretrain/{key}", getattr(event, key), event.step)

    def close(self) -> None:
        self.file.close()
        if self.writer is not None:
            self.writer.close()
        try:
            plot_loss_curve(self.run_dir / "log.jsonl", self.run_dir / "loss.png")
        except (OSError, ValueError):
            pass


def read_log(path: str | Path) -> list[dict]:
    """Records of a run's ``log.jsonl`` (later records win for a repeated step)."""
    by_step: dict[int, dict] = {}
    for line in Path(path).read_text().splitlines():
        if line.strip():
            record = json.loads(line)
            by_step[record["step"]] = record
    return [by_step[s] for s in sorted(by_step)]


def plot_loss_curve(log_path: str | Path, out_png: str | Path) -> Path | None:
    """Plot total/pos/neg/reg against step from ``log.jsonl`` (matplotlib, Agg)."""
    records = read_log(log_path)
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
    for key, colour in (("loss", "k"), ("pos", "C0"), ("neg", "C1"), ("reg", "C2")):
        values = np.array([r[key] for r in records], dtype=float)
        smooth = np.convolve(values, np.ones(window) / window, mode="valid")
        ax.plot(steps[window - 1 :], smooth, color=colour,
                label=f"{'total' if key == 'loss' else key} ({window}-step mean)")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss")
    ax.set_title("VoCo pretraining")
    ax.legend()
    fig.savefig(out_png, dpi=90)
    return Path(out_png)
