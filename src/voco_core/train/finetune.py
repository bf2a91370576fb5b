"""Finetuning MONAI's SwinUNETR for segmentation, from scratch or a VoCo backbone.

:func:`iter_finetune` is one loop, read top to bottom (build -> restore -> steps ->
save), yielding a :class:`FinetuneEvent` per step and one per validation, with the
same stop-flag and folder-lock contract as pretraining: the flag is checked before
every step and stopping writes a checkpoint first.

Run folder (:class:`~voco_core.run_folder.RunFolder`)::

    RUN_DIR/config.yaml            the full config (classes filled in)
    RUN_DIR/checkpoints/last.pt    model, optimizer, scheduler, scaler, step, RNG, best Dice
    RUN_DIR/checkpoints/best.pt    model + config of the best validation Dice
    RUN_DIR/meta.json              step, best Dice and per-class Dice (plain JSON)
    RUN_DIR/log.jsonl              one record per logged step and per validation
    RUN_DIR/tensorboard/           loss, lr and validation Dice for TensorBoard
    RUN_DIR/curves.png             loss and validation Dice, written when the run ends

Both checkpoints load with ``weights_only=True`` and feed
:func:`voco_core.inference.segment`.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.inferers import sliding_window_inference

from voco_core.checkpoint import (
    atomic_torch_save,
    check_weights,
    find_checkpoint,
    find_segmentation_checkpoint,
    load_segmentation_checkpoint,
    read_meta,
    require_keys,
    require_resumable,
    saved_config,
    segmentation_meta,
    segmentation_payload,
)
from voco_core.config import FinetuneConfig, finetune_config_from_dict, merge, resolve_device
from voco_core.data.datalists import (
    DatalistEntry,
    dataset_class_names,
    load_datalist,
    read_dataset_json,
    resolve_in_channels,
)
from voco_core.data.intensity import preprocessing_report
from voco_core.data.sampling import ResumableRandomSampler
from voco_core.data.segmentation import (
    LabelledCase,
    load_labelled_cases,
    seg_train_transforms,
    seg_transforms,
    split_validation,
)
from voco_core.data.sparse import check_sparse_label, class_values, masked_dice
from voco_core.errors import VoCoConfigError, VoCoDataError
from voco_core.models import BACKBONE_PREFIXES, build_swin_unetr
from voco_core.outputs import write_json
from voco_core.run_folder import RunFolder
from voco_core.segmentation_loss import MaskedDiceCELoss
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
from voco_core.train.events import FinetuneEvent, finite_or_none
from voco_core.train.run_log import RunLogger, plot_finetune_curves
from voco_core.weights import load_backbone

__all__ = ["FinetuneEvent", "FinetuneResult", "finetune", "finetune_resume_config",
           "iter_finetune", "plot_finetune_curves",
           "resolve_classes", "validate"]


@dataclass
class FinetuneResult:
    run_dir: Path
    last_checkpoint: Path
    best_checkpoint: Path | None
    best_dice: float
    step: int
    stopped: bool
    history: list[FinetuneEvent]


def resolve_classes(config: FinetuneConfig, cases: Sequence[LabelledCase],
                    declared: Sequence[str] = (), declared_in: str | Path | None = None
                    ) -> FinetuneConfig:
    """Fill in ``num_classes``/``class_names`` and check every label map against them.

    ``declared``: the class names a ``dataset.json`` (``declared_in``) lists, background
    first. The number of classes is the config's, else the declared count, else the
    largest label value + 1; names are the config's, else the declared ones (when the
    count matches), else ``class_i``. A label value outside the classes is refused;
    with ``data.ignore_label`` set, that value is not a class (sparse label maps) and a
    map with no annotated voxel is refused.
    """
    ignore = config.data.ignore_label
    found = max(int(class_values(c.values, ignore).max(initial=0)) for c in cases) + 1
    num_classes = config.data.num_classes or len(declared) or max(found, 2)
    names = (tuple(config.data.class_names)
             or (tuple(declared) if len(declared) == num_classes else ())
             or ("background", *(f"class_{i}" for i in range(1, num_classes))))
    from_json = bool(declared) and not config.data.num_classes
    for case in cases:
        values = class_values(case.values, ignore)
        outside = values[values >= num_classes]
        if from_json and outside.size:
            raise VoCoDataError(f"label value {int(outside[0])} is outside the classes "
                                f"0..{num_classes - 1} that {declared_in} declares "
                                f"({', '.join(declared)})", case.entry.label)
        check_sparse_label(case.entry.label, case.values, num_classes, ignore)
    return replace(config, data=replace(config.data, num_classes=num_classes, class_names=names))


def encoder_parameter_groups(model: torch.nn.Module) -> tuple[list, list]:
    """(encoder, decoder) parameters of a SwinUNETR: VoCo pretrains the encoder."""
    encoder, decoder = [], []
    for name, param in model.named_parameters():
        (encoder if name.startswith(BACKBONE_PREFIXES) else decoder).append(param)
    return encoder, decoder


@torch.no_grad()
def validate(model: torch.nn.Module, cases: Sequence[dict], config: FinetuneConfig,
             device: torch.device, dtype: torch.dtype | None) -> tuple[float, np.ndarray]:
    """Sliding-window Dice on pre-processed cases: (mean over foreground classes,
    per-class ``(C-1,)`` averaged over cases; NaN where a class is absent everywhere).
    Over annotated voxels only when ``data.ignore_label`` is set (sparse label maps)."""
    t = config.train
    model.eval()
    per_case = []
    for case in cases:
        image = case["image"].as_tensor()[None].to(device)
        with autocast(device, dtype):
            logits = sliding_window_inference(image, tuple(t.roi_size), t.sw_batch_size, model,
                                              overlap=t.sw_overlap, mode="gaussian")
        prediction = logits.float().argmax(dim=1, keepdim=True)
        truth = case["label"].as_tensor()[None].to(device).round().long()
        dice = masked_dice(prediction, truth, config.data.num_classes,
                           config.data.ignore_label)
        per_case.append(dice[0].cpu().numpy())
    model.train()
    per_class = np.nanmean(np.stack(per_case), axis=0) if per_case else np.array([])
    finite = per_class[np.isfinite(per_class)]
    return (float(finite.mean()) if finite.size else math.nan), per_class


def iter_finetune(
    config: FinetuneConfig,
    data: str | Path | Sequence[DatalistEntry],
    run_dir: str | Path | None = None,
    *,
    pretrained: str | Path | dict | None = None,
    validation: Sequence[DatalistEntry] | None = None,
    resume: str | Path | None = None,
    stop: StopFlag | None = None,
    initial: str | Path | None = None,
) -> Iterator[FinetuneEvent]:
    """Finetune a SwinUNETR, yielding a :class:`FinetuneEvent` per step.

    Args:
        config: validated :class:`FinetuneConfig`; when resuming, the run's own
            (see :func:`voco_core.plan.plan_finetune`); ``train.total_steps`` may grow.
        data: a folder (imagesTr/labelsTr), a Decathlon JSON, or entries with labels.
        run_dir: output folder (default ``config.run.output_dir``).
        pretrained: a VoCo checkpoint (own run or released weights) for the encoder;
            the load report is the ``start`` event's ``message``.
        validation: held-out cases; default: the JSON's ``validation`` section, else
            ``data.val_fraction`` of the training cases (else the training cases).
        resume: a finetuning run folder or its ``last.pt``.
        stop: checked before every step; when set, a checkpoint is written and the
            generator ends with a ``stopped`` event.
        initial: a finetuned checkpoint (run folder: its best.pt, else last.pt) whose
            whole network starts this new run (continue after correcting labels; see
            :func:`voco_core.plan.plan_continue`); recorded as ``parent`` in meta.json.
    """
    config.validate()
    if initial is not None and (resume is not None or pretrained is not None):
        raise VoCoConfigError("initial weights exclude resume and pretrained: a continued "
                              "run starts from its parent's whole network")
    device = resolve_device(config.run.device)
    folder = RunFolder(run_dir or config.run.output_dir)
    train_cases, val_cases = _labelled_cases(data, validation, config)
    declared, declared_in = (), None
    if isinstance(data, str | Path):
        declared = dataset_class_names(data)
        declared_in = Path(data) / "dataset.json" if Path(data).is_dir() else Path(data)
    config = resolve_classes(config, train_cases + val_cases, declared, declared_in)
    # The channel count comes from the images and is recorded in the run's config
    # (config.yaml, both checkpoints): inference builds the network for it and checks
    # every input against it.
    channels = resolve_in_channels([(c.entry.image_file, int(c.image.shape[0]))
                                    for c in train_cases + val_cases], config.data.in_channels)
    config = replace(config, data=replace(config.data, in_channels=channels))
    with folder.lock():
        yield from _finetune(config, train_cases, val_cases, folder, device, pretrained,
                             resume, stop, initial)


def _labelled_cases(data, validation: Sequence[DatalistEntry] | None,
                    config: FinetuneConfig) -> tuple[list[LabelledCase], list[LabelledCase]]:
    """(training, validation) cases: ``validation`` if given, else the JSON's
    ``validation`` section, else a ``data.val_fraction`` split (maybe empty)."""
    if isinstance(data, str | Path):
        train_cases = load_labelled_cases(load_datalist(data, section="training",
                                                        require_labels=True))
        if validation is None and read_dataset_json(data).get("validation"):
            validation = load_datalist(data, section="validation", require_labels=True)
    else:
        train_cases = load_labelled_cases(list(data))
    if validation:
        return train_cases, load_labelled_cases(list(validation), kind="validation")
    return split_validation(train_cases, config.data.val_fraction, config.run.seed)


def _finetune(config: FinetuneConfig, train_cases: list[LabelledCase],
              val_cases: list[LabelledCase], folder: RunFolder, device: torch.device,
              pretrained, resume, stop: StopFlag | None,
              initial=None) -> Iterator[FinetuneEvent]:
    t, seed = config.train, config.run.seed
    if resume is None:
        folder.require_no_run()
    folder.remove_stale_temporaries()
    val_source = "validation" if val_cases else "training"
    pre = seg_transforms(config.data)
    train_volumes = [pre({"image": c.image, "label": c.label}) for c in train_cases]
    val_volumes = [pre({"image": c.image, "label": c.label}) for c in (val_cases or train_cases)]
    notes = preprocessing_report(
        {c.entry.image_file.name: v for c, v in zip(
            [*train_cases, *val_cases], [*train_volumes, *(val_volumes if val_cases else [])],
            strict=True)}, config.data)
    crop = seg_train_transforms(t, config.data.ignore_label)

    # ---- build
    torch.manual_seed(seed)
    model = build_swin_unetr(config.model, config.data.num_classes,
                             config.data.image_channels).to(device)
    message = ""
    if pretrained is not None and resume is None:
        message = load_backbone(model, pretrained).summary()
    parent = _previous_parent(folder) if resume is not None else None
    if initial is not None:
        parent = _load_initial(model, initial, config)
        message = f"continuing from {parent['checkpoint']} (its step {parent['step']})"
    compile_forward([model], config.run)  # run.compile (weights loaded first)
    optimizer, lambdas = _optimizer(model, t, device)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambdas)
    dtype = amp_dtype(t.amp, device)
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    masked_dice_ce = MaskedDiceCELoss(ce_balance=t.ce_balance, batch_dice=t.batch_dice)

    def loss_fn(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return masked_dice_ce(logits, labels, config.data.ignore_label)

    update = _Update(model, loss_fn, optimizer, scheduler, scaler, dtype, device, t.clip_norm)

    # ---- restore
    step, best = 0, _Best()
    if resume is not None:
        resume = find_checkpoint(resume)  # a run folder: its last.pt (never best.pt)
        state = load_segmentation_checkpoint(resume, map_location=device)
        require_resumable(state, "finetune", resume)
        _require_same_network(saved_config(state, "finetune", resume), config, resume,
                              "resume with the run's own config (plan_finetune)")
        restore_state(state, resume, device, modules={"model": model}, optimizer=optimizer,
                      scheduler=scheduler, scaler=scaler)
        step = int(state["step"])
        best = _Best(float(state["best_dice"]), int(state["best_step"]),
                     folder.best if folder.best.is_file() else None)
        message = f"resumed from {resume} at step {step}"
        del state

    names = list(config.data.class_names[1:])
    order = iter(ResumableRandomSampler(len(train_volumes), seed, start=step * t.batch_volumes))

    def save() -> Path:
        require_finite_weights([model], step, "try a lower train.lr")
        atomic_torch_save(segmentation_payload(
            "last", step=step, config=config.to_dict(), model=model.state_dict(),
            best_dice=best.dice, best_step=best.step, optimizer=optimizer.state_dict(),
            scheduler=scheduler.state_dict(),
            scaler=scaler.state_dict() if scaler.is_enabled() else None,
            rng=rng_state(device)), folder.last)
        write_json(folder.meta, segmentation_meta(
            step=step, total_steps=t.total_steps, best_dice=best.dice, best_step=best.step,
            class_dice_at_best=dict(zip(names, best.per_class, strict=False)),
            validated_on=val_source, num_classes=config.data.num_classes,
            class_names=list(config.data.class_names),
            ignore_label=config.data.ignore_label, parent=parent))
        return folder.last

    # ---- loop of steps (the folder is written from here on: a run that cannot start
    # leaves an existing run's config and log as they were)
    try:
        config.save(folder.config_file)
    except OSError as err:
        raise VoCoDataError(f"output folder is not writable ({err.strerror or err})",
                            folder.root) from err
    logger = RunLogger(folder, tag="finetune", start_step=step,
                       tensorboard=config.run.tensorboard, figure=folder.curves_figure,
                       plot=plot_finetune_curves)
    message = "\n".join(line for line in (message, *notes) if line)
    last = FinetuneEvent("start", step, t.total_steps, run_dir=str(folder.root), message=message,
                         best_dice=finite_or_none(best.dice), best_step=best.step)
    saved_step = step if resume is not None else -1
    clock = StepClock()
    try:
        with training_settings(device, config.run):
            yield last
            while step < t.total_steps:
                if stop is not None and stop.is_set():
                    if saved_step != step:
                        save()
                        saved_step = step
                    last = replace(last, kind="stopped", checkpoint=str(folder.last))
                    yield last
                    return
                reset_peak_memory(device)  # the event reports this step's peak
                clock.start()
                images, labels = _crops(train_volumes, order, crop, seed, step,
                                        t.batch_volumes, device)
                loss = _train_step(update, images, labels, step)
                step += 1
                elapsed, eta = clock.lap(t.total_steps - step)
                last = replace(last, kind="step", step=step, loss=loss,
                               lr=optimizer.param_groups[0]["lr"], seconds_per_step=elapsed,
                               eta_seconds=eta, peak_memory_bytes=peak_memory_bytes(device),
                               checkpoint=None, message="")
                if step % config.run.log_every == 0 or step == t.total_steps:
                    logger.write({"step": step, "loss": loss, "lr": last.lr,
                                  "seconds_per_step": elapsed}, {"loss": loss, "lr": last.lr})
                if step % t.val_every == 0 or step == t.total_steps:
                    # Say so first: validation can take longer than many steps.
                    yield replace(last, message=f"validating on {len(val_volumes)} "
                                                f"{val_source} case(s)")
                    mean_dice, per_class = validate(model, val_volumes, config, device, dtype)
                    if math.isfinite(mean_dice) and mean_dice > best.dice:
                        require_finite_weights([model], step, "try a lower train.lr")
                        best = _Best(mean_dice, step, atomic_torch_save(segmentation_payload(
                            "best", step=step, config=config.to_dict(),
                            model=model.state_dict(), best_dice=mean_dice, best_step=step),
                            folder.best), [finite_or_none(d) for d in per_class])
                    class_dice = dict(zip(names, map(finite_or_none, per_class), strict=True))
                    logger.write({"step": step, "mean_dice": mean_dice,
                                  "class_dice": class_dice, "on": val_source},
                                 {"mean_dice": mean_dice})
                    last = replace(last, kind="validation", mean_dice=mean_dice,
                                   class_dice=class_dice, best_dice=finite_or_none(best.dice),
                                   best_step=best.step, message="",
                                   best_checkpoint=str(best.path) if best.path else None)
                if step % config.run.checkpoint_every == 0 or step == t.total_steps:
                    last = replace(last, checkpoint=str(save()))
                    saved_step = step
                yield last
            last = replace(last, kind="done")
            yield last
    except BaseException:
        keep_progress(save, step, saved_step)  # the steps done since the last checkpoint
        raise
    finally:
        logger.close()


def _load_initial(model: torch.nn.Module, initial: str | Path,
                  config: FinetuneConfig) -> dict[str, Any]:
    """Load a finetuned checkpoint's whole network into ``model``; returns the parent
    record for meta.json (run folder, checkpoint, its step and best Dice)."""
    path = find_segmentation_checkpoint(initial)
    state = load_segmentation_checkpoint(path)
    require_keys(state, ("model", "config", "step"), path)
    _require_same_network(saved_config(state, "finetune", path), config, path,
                          "continue with plan_continue, which takes the parent's config")
    check_weights(state["model"], model.state_dict(), path, "model")
    model.load_state_dict(state["model"])
    folder = RunFolder.of(path)
    return {"run": str(folder.root) if folder else None, "checkpoint": str(path),
            "step": int(state["step"]), "best_dice": finite_or_none(state.get("best_dice",
                                                                              math.nan))}


def _require_same_network(saved: FinetuneConfig, config: FinetuneConfig, source: str | Path,
                          remedy: str) -> None:
    """The one compatibility check of a finetuning checkpoint (resumed or continued)
    with this run: the same network (model section), classes and image channels."""
    if saved.model != config.model or saved.data.num_classes != config.data.num_classes:
        raise VoCoConfigError(f"{source}: its model or classes ({saved.data.num_classes}) "
                              f"differ from this run's ({config.data.num_classes}); {remedy}")
    if saved.data.image_channels != config.data.image_channels:
        raise VoCoConfigError(f"{source}: its network takes {saved.data.image_channels} image "
                              f"channel(s), this run's images have "
                              f"{config.data.image_channels}")


def _previous_parent(folder: RunFolder) -> dict | None:
    """The parent recorded by the run being resumed (its meta.json), if any."""
    return read_meta(folder).get("parent")


@dataclass
class _Best:
    """The best validation so far: mean Dice (-inf before any), step, ``best.pt``,
    per-class Dice (JSON-safe)."""

    dice: float = -math.inf
    step: int = -1
    path: Path | None = None
    per_class: list = None  # type: ignore[assignment]

    def __post_init__(self) -> None:
        self.per_class = self.per_class or []


def _optimizer(model: torch.nn.Module, t,
               device: torch.device) -> tuple[torch.optim.Optimizer, list[Callable]]:
    """AdamW over (decoder, encoder) groups, the encoder at ``lr * encoder_lr_scale``
    (frozen when 0, at LR 0 for the first ``freeze_encoder_steps``); one LR factor
    function per group."""
    encoder, decoder = encoder_parameter_groups(model)
    if t.encoder_lr_scale == 0:
        for p in encoder:
            p.requires_grad_(False)
    groups = [{"params": decoder, "lr": t.lr}]
    if t.encoder_lr_scale > 0:
        groups.append({"params": encoder, "lr": t.lr * t.encoder_lr_scale})
    schedule = warmup_cosine(t.warmup_steps, t.total_steps, t.min_lr / t.lr)

    def encoder_schedule(s: int) -> float:
        return 0.0 if s < t.freeze_encoder_steps else schedule(s)

    optimizer = adamw(groups, device, lr=t.lr, weight_decay=t.weight_decay)
    return optimizer, [schedule, encoder_schedule][: len(groups)]


def _crops(volumes: list[dict], order: Iterator[int], crop, seed: int, step: int,
           batch_volumes: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """``(N, C, X, Y, Z)`` image and ``(N, 1, X, Y, Z)`` label crops of the next
    ``batch_volumes`` volumes,
    drawn from (seed, step, volume slot): the same crops after a resume."""
    crops = []
    for b in range(batch_volumes):
        index = next(order)
        crop.set_random_state(seed=int(np.random.default_rng([seed, step, b]).integers(2**31)))
        with warnings.catch_warnings():  # crops of all-foreground volumes
            warnings.filterwarnings("ignore", message="Num foregrounds")
            crops += crop(volumes[index])
    images = torch.stack([c["image"] for c in crops]).to(device)
    labels = torch.stack([c["label"] for c in crops]).to(device)
    return images, labels


@dataclass
class _Update:
    """The network and what updates it: one optimizer step is :func:`_train_step`."""

    model: torch.nn.Module
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler
    dtype: torch.dtype | None
    device: torch.device
    clip_norm: float


def _train_step(update: _Update, images: torch.Tensor, labels: torch.Tensor,
                step: int) -> float:
    """One optimizer step of DiceCE (over annotated voxels) on a batch of crops
    (``images (N, C, X, Y, Z)``, ``labels (N, 1, X, Y, Z)``); returns the loss."""
    model, optimizer, scaler = update.model, update.optimizer, update.scaler
    model.train()
    optimizer.zero_grad(set_to_none=True)
    with autocast(update.device, update.dtype):
        loss = update.loss_fn(model(images), labels)
    check_finite(loss, step, "try a lower train.lr")
    scaler.scale(loss).backward()
    if update.clip_norm > 0:
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(model.parameters(), update.clip_norm)
    scaler.step(optimizer)
    scaler.update()
    update.scheduler.step()
    return loss.item()


def finetune_resume_config(resume: str | Path, **overrides: Any) -> FinetuneConfig:
    """The config stored in a finetuning run's ``last.pt``, with nested overrides."""
    path = find_checkpoint(resume)
    saved = saved_config(load_segmentation_checkpoint(path), "finetune", path)
    return finetune_config_from_dict(merge(saved.to_dict(), overrides))


def finetune(config: FinetuneConfig, data, run_dir=None, *, pretrained=None, validation=None,
             resume=None, stop: StopFlag | None = None, initial=None,
             callback: Callable[[FinetuneEvent], None] | None = None) -> FinetuneResult:
    """Run :func:`iter_finetune` to the end; ``callback`` receives every event."""
    history: list[FinetuneEvent] = []
    for event in iter_finetune(config, data, run_dir, pretrained=pretrained,
                               validation=validation, resume=resume, stop=stop,
                               initial=initial):
        history.append(event)
        if callback is not None:
            callback(event)
    final = history[-1]
    folder = RunFolder(final.run_dir)
    return FinetuneResult(folder.root, folder.last,
                          folder.best if folder.best.is_file() else None,
                          final.best_dice, final.step, final.kind == "stopped", history)
