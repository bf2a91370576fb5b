"""VoCo pretraining: one loop, read top to bottom (build -> restore -> steps -> save).

:func:`iter_pretrain` is a generator of :class:`PretrainEvent` records (``start``,
one ``step`` per optimizer step, then ``stopped`` or ``done``), which the CLI turns
into a progress bar and the napari plugin into a progress bar and a live plot.
:func:`pretrain` drives it with an optional callback. A cooperative ``stop`` flag
(anything with ``is_set()``, e.g. ``threading.Event``) is checked before every step;
stopping writes a checkpoint first. The run holds its folder's lock
(:meth:`RunFolder.lock`) from set-up to the end.

Run folder (:class:`~voco_core.run_folder.RunFolder`)::

    RUN_DIR/config.yaml          the full config of the run
    RUN_DIR/checkpoints/last.pt  student, teacher, optimizer, scheduler, scaler,
                                 step, config, data position and RNG states
    RUN_DIR/meta.json            step, loss, time of the last checkpoint (plain JSON)
    RUN_DIR/log.jsonl            one JSON record per logged step: loss, terms, lr, ...
    RUN_DIR/tensorboard/         the same scalars for TensorBoard
    RUN_DIR/loss.png             loss curves, written when the run ends or stops
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel

from voco_core.checkpoint import (
    atomic_torch_save,
    load_pretrain_checkpoint,
    pretrain_meta,
    pretrain_payload,
    require_resumable,
    saved_config,
)
from voco_core.config import PretrainConfig, merge, pretrain_config_from_dict, resolve_device
from voco_core.data.datalists import DatalistEntry, load_datalist, resolve_in_channels
from voco_core.data.intensity import PreprocessingNotes
from voco_core.data.io import check_volume_header
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
    DistContext,
    any_rank,
    gather_strings,
    mean_over_ranks,
    setup_distributed,
    teardown_distributed,
    weights_digest,
)
from voco_core.errors import VoCoConfigError, VoCoDataError, VoCoTrainingError
from voco_core.losses import build_loss
from voco_core.models import StudentTeacher
from voco_core.outputs import write_json
from voco_core.run_folder import RunFolder, read_log
from voco_core.train.batch_size import resolve_batch_size
from voco_core.train.common import (
    StepClock,
    StopFlag,
    adamw,
    amp_dtype,
    autocast,
    check_finite,
    compile_forward,
    keep_progress,
    peak_memory_bytes,
    require_finite_weights,
    reset_peak_memory,
    restore_state,
    rng_state,
    training_settings,
    warmup_cosine,
)
from voco_core.train.events import PretrainEvent
from voco_core.train.run_log import RunLogger, plot_loss_curve

__all__ = ["PretrainEvent", "PretrainResult", "iter_pretrain", "plot_loss_curve", "pretrain",
           "read_log", "resume_config", "voco_loss_on_batch"]


@dataclass
class _Pretraining:
    """What every step of one pretraining works with: built once, restored from a
    checkpoint, then advanced by :func:`_train_step` (``step``: optimizer steps done;
    ``samples_seen``: volumes drawn by all ranks together, the data stream's position)."""

    config: PretrainConfig
    model: StudentTeacher
    forward: Callable  # the model, or its DDP wrapper
    loss_fn: Callable
    params: list
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler
    dtype: torch.dtype | None
    dist_ctx: DistContext
    device: torch.device
    step: int = 0
    samples_seen: int = 0


@dataclass
class PretrainResult:
    run_dir: Path
    checkpoint: Path
    step: int
    stopped: bool
    history: list[PretrainEvent]


def voco_loss_on_batch(model: Callable, loss_fn: Callable, batch: VoCoBatch) -> dict:
    """One forward of all ``B * (K + m)`` crops, split back into bases and sub-volumes.

    ``model`` is a :class:`StudentTeacher` (or its DDP wrapper): crops -> (student, teacher)
    features ``(B * (K + m), D)``; returns the loss's dict (``total`` and its terms).
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


def loss_terms(losses: dict) -> list[str]:
    """Names of the scalar terms in a loss's dict (everything but ``total``/``logits``)."""
    return [k for k, v in losses.items() if k not in ("total", "logits") and v.ndim == 0]


def check_dataset(entries: Sequence[DatalistEntry], config: PretrainConfig) -> int:
    """Header-level pre-flight of every volume (fast; voxel data is checked on load).
    Returns the images' channel count: the same for all, and ``data.in_channels``
    when that is set (:func:`~voco_core.data.datalists.resolve_in_channels`)."""
    channels = []
    for entry in entries:
        shape = check_volume_header(entry.image, min_shape=min_raw_shape(config))
        channels.append((entry.image_file, shape[3] if len(shape) == 4 else 1))
    return resolve_in_channels(channels, config.data.in_channels)


def iter_pretrain(
    config: PretrainConfig,
    data: str | Path | Sequence[DatalistEntry],
    run_dir: str | Path | None = None,
    *,
    resume: str | Path | None = None,
    stop: StopFlag | None = None,
) -> Iterator[PretrainEvent]:
    """Pretrain, yielding a :class:`PretrainEvent` per optimizer step.

    Under ``torchrun`` (or with a process group already initialised) this is one
    DDP rank: every rank yields events with the loss averaged over ranks; only
    rank 0 locks the folder and writes checkpoints and logs.

    Args:
        config: the run's configuration (validated). When resuming, pass the
            checkpoint's config (see :func:`voco_core.plan.plan_pretrain`);
            ``optim.total_steps`` may be raised to train longer,
            ``optim.batch_size``/``grad_accum`` and the world size may change.
        data: a folder, a Decathlon JSON, or datalist entries.
        run_dir: output folder (default ``config.run.output_dir``).
        resume: a run folder or checkpoint to continue from (exactly: model,
            teacher, optimizer, scheduler, scaler, step, data position, RNG state).
        stop: checked before every step; when set (on any rank), a checkpoint is
            written and the generator ends with a ``stopped`` event.
    """
    config.validate()
    dist_ctx, device = setup_distributed(resolve_device(config.run.device))
    folder = RunFolder(run_dir or config.run.output_dir)
    try:
        entries = list(data) if not isinstance(data, str | Path) else load_datalist(data)
        # The channel count comes from the data and is recorded in the run's config
        # (config.yaml, the checkpoint): the network is built for it, inference checks it.
        config = replace(config, data=replace(config.data,
                                              in_channels=check_dataset(entries, config)))
        # batch_size auto: the numbers chosen for this device go into the saved config
        config, batch_note = resolve_batch_size(config, device, dist_ctx)
        with folder.lock() if dist_ctx.is_main else nullcontext():
            yield from _pretrain(config, entries, folder, dist_ctx, device, resume, stop,
                                 batch_note)
    finally:
        teardown_distributed(dist_ctx)


def _pretrain(config: PretrainConfig, entries: list[DatalistEntry], folder: RunFolder,
              dist_ctx: DistContext, device: torch.device, resume: str | Path | None,
              stop: StopFlag | None, batch_note: str = "") -> Iterator[PretrainEvent]:
    o, seed = config.optim, config.run.seed
    if dist_ctx.is_main:
        if resume is None:
            folder.require_no_run()
        folder.remove_stale_temporaries()

    # ---- build
    torch.manual_seed(seed)
    model = StudentTeacher(config.model, config.data.image_channels).to(device)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = adamw(params, device, lr=o.lr, weight_decay=o.weight_decay, amsgrad=o.amsgrad)
    dtype = amp_dtype(o.amp, device)
    run = _Pretraining(
        config, model, model, build_loss(config), params, optimizer,
        torch.optim.lr_scheduler.LambdaLR(
            optimizer, warmup_cosine(o.warmup_steps, o.total_steps, o.min_lr / o.lr)),
        torch.amp.GradScaler(device.type, enabled=dtype == torch.float16), dtype, dist_ctx,
        device)

    # ---- restore
    if resume is not None:
        state = load_pretrain_checkpoint(resume, map_location=device)
        require_resumable(state, "pretrain", resume)
        _check_resumable(saved_config(state, "pretrain", resume), config, resume)
        restore_state(state, resume, device, modules={"student": model.student,
                                                      "teacher": model.teacher},
                      optimizer=run.optimizer, scheduler=run.scheduler, scaler=run.scaler)
        run.step, run.samples_seen = int(state["step"]), int(state["samples_seen"])
        del state

    # run.compile: the backbones, the costly part (the heads are two linear layers)
    compile_forward([model.student.backbone, getattr(model.teacher, "backbone", None)],
                    config.run)

    # DDP over the whole model: only the student's parameters require gradients;
    # the teacher follows from identical students, so it stays identical too.
    if dist_ctx.active:
        run.forward = DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None,
            broadcast_buffers=False)  # the only buffers are constant index tables
    notes = PreprocessingNotes(config.data)
    volumes = _volume_stream(entries, config, dist_ctx, device, run.samples_seen, notes)
    sampler = VoCoCropSampler(config)
    crops_per_step = (o.batch_size * o.grad_accum * dist_ctx.world_size
                      * (config.num_base_crops + config.geometry.num_random_crops))

    def save(loss: float, check_ranks: bool = True) -> Path:
        digests = None
        if dist_ctx.active and check_ranks:  # a collective: every rank saves at the same step
            modules = [m for m in (model.student, model.teacher) if m is not None]
            digests = gather_strings(weights_digest(*modules), dist_ctx)
            if len(set(digests)) != 1:
                raise VoCoTrainingError(f"DDP ranks hold different weights at step {run.step}")
        if dist_ctx.is_main:
            require_finite_weights([model.student, model.teacher], run.step,
                                   "try a lower optim.lr or optim.amp=off")
            _save_checkpoint(folder, run, loss, digests)
        return folder.last

    # ---- loop of steps (the folder is written from here on: a run that cannot start
    # leaves an existing run's config and log as they were)
    logger = None
    if dist_ctx.is_main:
        _save_config(config, folder)
        logger = RunLogger(folder, tag="pretrain", start_step=run.step,
                           tensorboard=config.run.tensorboard, figure=folder.loss_figure,
                           plot=plot_loss_curve)
    last = PretrainEvent("start", run.step, o.total_steps, run_dir=str(folder.root),
                         message=batch_note)
    saved_step = run.step if resume is not None else -1
    clock = StepClock()
    try:
        with training_settings(device, config.run):
            yield last
            while run.step < o.total_steps:
                if any_rank(stop is not None and stop.is_set(), dist_ctx, device):
                    if saved_step != run.step:
                        save(last.loss)
                        saved_step = run.step
                    last = replace(last, kind="stopped", checkpoint=str(folder.last), message="")
                    yield last
                    return
                reset_peak_memory(device)  # the event reports this step's peak
                clock.start()
                names, (loss, *terms) = _train_step(run, sampler, volumes)
                elapsed, eta = clock.lap(o.total_steps - run.step)
                checkpoint = None
                if run.step % config.run.checkpoint_every == 0 or run.step == o.total_steps:
                    checkpoint = str(save(loss))
                    saved_step = run.step
                last = PretrainEvent(
                    "step", run.step, o.total_steps, loss=loss,
                    lr=run.optimizer.param_groups[0]["lr"], seconds_per_step=elapsed,
                    eta_seconds=eta, peak_memory_bytes=peak_memory_bytes(device),
                    checkpoint=checkpoint, run_dir=str(folder.root),
                    terms=dict(zip(names, terms, strict=True)),
                    crops_per_second=crops_per_step / elapsed, message=notes.take())
                if logger is not None and (run.step % config.run.log_every == 0
                                           or run.step == o.total_steps):
                    logger.write(_log_record(last), {"loss": loss, **last.terms, "lr": last.lr,
                                                     "crops_per_second": last.crops_per_second})
                yield last
            last = replace(last, kind="done", message="")
            yield last
    except BaseException:
        # Keep the progress made so far (after a NaN too: the check comes before the
        # update, so the weights are those of `step`). Other ranks may not be here:
        # no collective.
        keep_progress(lambda: save(last.loss, check_ranks=False), run.step, saved_step)
        raise
    finally:
        if logger is not None:
            logger.close()
        volumes.close()  # ends the DataLoader (and its workers) now, not at garbage collection


def _train_step(run: _Pretraining, sampler: VoCoCropSampler,
                volumes: Iterator[list]) -> tuple[list[str], list[float]]:
    """One optimizer step over ``grad_accum`` micro-batches, then the teacher's EMA;
    advances ``run.step`` and ``run.samples_seen``.

    Returns the term names and ``[total, *terms]`` averaged over the micro-batches and
    ranks. One device->host sync per step, after the backward passes: the loss terms
    stay on the device until then, and the NaN check reads the same host copy (before
    the update, so a NaN leaves the weights of ``step``; under DDP a NaN on any rank
    reaches every rank through the average, so all stop together). The step's event
    carries the loss, so this one sync stays.
    """
    o, seed, ranks = run.config.optim, run.config.run.seed, run.dist_ctx
    run.model.train()
    run.optimizer.zero_grad(set_to_none=True)
    names, summed = [], None
    for micro in range(o.grad_accum):
        batch_volumes = next(volumes)
        # One generator per volume, from (seed, step, global volume index): the same
        # crops whichever rank or micro-batch draws the volume.
        first = (micro * ranks.world_size + ranks.rank) * o.batch_size
        rngs = [np.random.default_rng([seed, run.step, first + b])
                for b in range(len(batch_volumes))]
        batch = sampler(batch_volumes, rngs)
        # All-reduce gradients once per optimizer step, not per micro-batch.
        sync = (nullcontext() if not ranks.active or micro == o.grad_accum - 1
                else run.forward.no_sync())
        with sync:
            with autocast(run.device, run.dtype):
                losses = voco_loss_on_batch(run.forward, run.loss_fn, batch)
            run.scaler.scale(losses["total"] / o.grad_accum).backward()
        names = loss_terms(losses)
        values = torch.stack([losses[k].detach().float() for k in ("total", *names)])
        summed = values if summed is None else summed + values  # a NaN in any stays NaN
    averaged = mean_over_ranks(summed / o.grad_accum, ranks, run.device)
    check_finite(averaged[0], run.step, "try a lower optim.lr or optim.amp=off")
    if o.clip_norm > 0:
        run.scaler.unscale_(run.optimizer)  # clip the true gradients, also under fp16
        torch.nn.utils.clip_grad_norm_(run.params, o.clip_norm)
    run.scaler.step(run.optimizer)
    run.scaler.update()
    run.scheduler.step()
    run.model.update_teacher()
    run.step += 1
    run.samples_seen += o.batch_size * o.grad_accum * ranks.world_size
    return names, averaged


def _volume_stream(entries: list[DatalistEntry], config: PretrainConfig, dist_ctx: DistContext,
                   device: torch.device, samples_seen: int,
                   notes: PreprocessingNotes) -> Iterator[list[torch.Tensor]]:
    """Batches of pre-processed volumes on ``device``, from where all ranks together
    had got to: each rank takes every world_size-th index of one shuffled stream (so
    resuming on another world size works). What pre-processing chose for each new
    volume goes to ``notes``."""
    o = config.optim
    order = ResumableRandomSampler(len(entries), config.run.seed,
                                   start=samples_seen // dist_ctx.world_size,
                                   rank=dist_ctx.rank, world_size=dist_ctx.world_size)
    loader = torch.utils.data.DataLoader(
        PretrainDataset(entries, config, with_sources=True), batch_size=o.batch_size,
        sampler=order,
        num_workers=config.data.num_workers, collate_fn=collate_list,
        pin_memory=config.data.pin_memory and device.type == "cuda",
        persistent_workers=config.data.num_workers > 0)
    for batch in loader:
        for item in batch:
            if isinstance(item, LoadFailure):
                raise VoCoDataError(item.message)
            notes.add(item.name, item.intensity, item.foreground_kept)
        yield [v.image.to(device, non_blocking=True) for v in batch]


def _save_config(config: PretrainConfig, folder: RunFolder) -> None:
    folder.create()
    try:
        config.save(folder.config_file)
    except OSError as err:
        raise VoCoDataError(f"output folder is not writable ({err.strerror or err})",
                            folder.root) from err


def _save_checkpoint(folder: RunFolder, run: _Pretraining, loss: float,
                     digests: list[str] | None) -> None:
    """``last.pt`` then ``meta.json`` (the loss of ``run.step``; null before the first)."""
    config, model = run.config, run.model
    atomic_torch_save(pretrain_payload(
        step=run.step, samples_seen=run.samples_seen, world_size=run.dist_ctx.world_size,
        config=config.to_dict(), student=model.student.state_dict(),
        teacher=model.teacher.state_dict() if model.teacher is not None else None,
        optimizer=run.optimizer.state_dict(), scheduler=run.scheduler.state_dict(),
        scaler=run.scaler.state_dict() if run.scaler.is_enabled() else None,
        rng=rng_state(run.device)), folder.last)
    write_json(folder.meta, pretrain_meta(
        step=run.step, total_steps=config.optim.total_steps, folder=folder,
        preset=config.preset, teacher=config.model.teacher, loss_variant=config.loss.variant,
        world_size=run.dist_ctx.world_size, rank_weight_digests=digests, loss=loss))


def _log_record(event: PretrainEvent) -> dict[str, Any]:
    """A ``log.jsonl`` record: the event's numbers, the loss terms under ``terms``."""
    return {k: v for k, v in event.to_dict().items() if k not in ("kind", "run_dir", "message")}


def _check_resumable(saved: PretrainConfig, config: PretrainConfig, source: str | Path) -> None:
    """The one compatibility check of a pretraining checkpoint with the resumed run."""
    # Checkpointing changes how a step is computed, not the weights (batch_size auto
    # may choose it differently on another GPU).
    plain = replace(saved.model, gradient_checkpointing=config.model.gradient_checkpointing)
    if plain != config.model or saved.geometry != config.geometry:
        raise VoCoConfigError(
            f"{source}: the checkpoint's model/geometry differ from the config; resume with "
            "the run's own config (voco_core.plan.plan_pretrain(resume=...))")
    if saved.data.image_channels != config.data.image_channels:
        raise VoCoConfigError(
            f"{source}: the checkpoint's network takes {saved.data.image_channels} image "
            f"channel(s), the data have {config.data.image_channels}; resume with the data "
            "it was trained on")


def resume_config(resume: str | Path, **overrides: Any) -> PretrainConfig:
    """The config stored in a run's checkpoint, with nested overrides
    (e.g. ``optim={"total_steps": 200}, run={"device": "cpu"}``)."""
    saved = saved_config(load_pretrain_checkpoint(resume), "pretrain", resume)
    return pretrain_config_from_dict(merge(saved.to_dict(), overrides))


def pretrain(
    config: PretrainConfig,
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
    return PretrainResult(Path(final.run_dir), RunFolder(final.run_dir).last, final.step,
                          final.kind == "stopped", history)
