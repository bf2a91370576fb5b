"""Finetuning MONAI's SwinUNETR for segmentation, from scratch or a VoCo backbone.

:func:`iter_finetune` is one loop, read top to bottom, yielding a
:class:`FinetuneEvent` per step (and one per validation), with the same
stop-flag contract as pretraining: the flag is checked before every step and
stopping writes a checkpoint first.

Run folder::

    RUN_DIR/config.yaml            the full config (classes filled in)
    RUN_DIR/checkpoints/last.pt    model, optimizer, scheduler, scaler, step, RNG, best Dice
    RUN_DIR/checkpoints/best.pt    model + config of the best validation Dice
    RUN_DIR/meta.json              step, best Dice and per-class Dice (plain JSON)
    RUN_DIR/log.jsonl              one record per logged step and per validation
    RUN_DIR/curves.png             loss and validation Dice, written when the run ends

Both checkpoints load with ``weights_only=True`` and feed
:func:`voco_core.inference.segment`.
"""

from __future__ import annotations

import json
import math
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from monai.inferers import sliding_window_inference
from monai.losses import DiceCELoss
from monai.metrics import compute_dice
from monai.networks.utils import one_hot

from voco_core import __version__
from voco_core.checkpoint import (
    BEST_NAME,
    CHECKPOINT_NAME,
    SEGMENTATION_FORMAT,
    atomic_torch_save,
    write_json,
)
from voco_core.checkpoint import load_segmentation_checkpoint as load_finetune_checkpoint
from voco_core.config import FinetuneConfig, finetune_config_from_dict, merge, resolve_device
from voco_core.data.io import DatalistEntry, load_datalist
from voco_core.data.sampling import ResumableRandomSampler
from voco_core.data.segmentation import (
    LabelledCase,
    check_label_range,
    load_labelled_cases,
    seg_train_transforms,
    seg_transforms,
    split_validation,
)
from voco_core.errors import VoCoConfigError, VoCoDataError
from voco_core.models import BACKBONE_PREFIXES, build_swin_unetr
from voco_core.train.pretrain import (
    StopFlag,
    VoCoTrainingError,
    _restore_backend_flags,
    _restore_rng,
    _rng_state,
    _set_backend_flags,
    amp_dtype,
    peak_memory_bytes,
    warmup_cosine,
)
from voco_core.weights import load_backbone

SEG_FORMAT = SEGMENTATION_FORMAT
LAST, BEST = CHECKPOINT_NAME, BEST_NAME


@dataclass
class FinetuneEvent:
    """One progress record.

    ``kind``: ``start``, ``step`` (after each optimizer step), ``validation`` (after
    a sliding-window validation: ``mean_dice`` and ``class_dice`` set), ``stopped``
    or ``done``. Dice is over foreground classes, NaN until the first validation.
    ``message`` carries the pretrained-weights load report on ``start``.
    """

    kind: Literal["start", "step", "validation", "stopped", "done"]
    step: int
    total_steps: int
    loss: float = math.nan
    lr: float = math.nan
    seconds_per_step: float = math.nan
    eta_seconds: float = math.nan
    peak_memory_bytes: int = 0
    mean_dice: float = math.nan
    class_dice: dict[str, float] = field(default_factory=dict)
    best_dice: float = math.nan
    best_step: int = -1
    checkpoint: str | None = None
    best_checkpoint: str | None = None
    run_dir: str = ""
    message: str = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class FinetuneResult:
    run_dir: Path
    last_checkpoint: Path
    best_checkpoint: Path | None
    best_dice: float
    step: int
    stopped: bool
    history: list[FinetuneEvent]


def _entries(data: str | Path | Sequence[DatalistEntry], section: str) -> list[DatalistEntry]:
    if not isinstance(data, str | Path):
        return list(data)
    return load_datalist(data, section=section, require_labels=True)


def _datalist_json(data) -> dict:
    """The Decathlon JSON behind ``data`` (a JSON file or a folder with dataset.json), or {}."""
    if isinstance(data, str | Path):
        path = Path(data)
        path = path / "dataset.json" if path.is_dir() else path
        if path.suffix == ".json" and path.is_file():
            try:
                spec = json.loads(path.read_text())
                return spec if isinstance(spec, dict) else {}
            except (OSError, UnicodeDecodeError, json.JSONDecodeError):
                return {}
    return {}


def _validation_entries(data) -> list[DatalistEntry]:
    """The datalist's own ``validation`` section, when it is a JSON that has one."""
    if _datalist_json(data).get("validation"):
        return load_datalist(data, section="validation", require_labels=True)
    return []


def _dataset_class_names(data, num_classes: int) -> tuple[str, ...]:
    """Names from a Decathlon JSON's ``labels`` map ({"0": "background", ...}), if complete."""
    labels = _datalist_json(data).get("labels")
    if isinstance(labels, dict):
        names = tuple(str(labels.get(str(i), "")) for i in range(num_classes))
        if all(names):
            return names
    return ()


def resolve_classes(config: FinetuneConfig, cases: Sequence[LabelledCase],
                    dataset_names=lambda num_classes: ()) -> FinetuneConfig:
    """Fill in ``num_classes``/``class_names`` from the labels (names: the config's,
    else ``dataset_names(num_classes)``, else ``class_i``), and check every label map
    against them."""
    found = max(int(c.values.max()) for c in cases) + 1
    num_classes = config.data.num_classes or max(found, 2)
    names = (tuple(config.data.class_names) or dataset_names(num_classes)
             or ("background", *(f"class_{i}" for i in range(1, num_classes))))
    for case in cases:
        check_label_range(case.entry.label, case.values, num_classes)
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
    per-class ``(C-1,)`` averaged over cases; NaN where a class is absent everywhere)."""
    t = config.train
    model.eval()
    per_case = []
    for case in cases:
        image = case["image"].as_tensor()[None].to(device)
        with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            logits = sliding_window_inference(image, tuple(t.roi_size), t.sw_batch_size, model,
                                              overlap=t.sw_overlap, mode="gaussian")
        prediction = logits.float().argmax(dim=1, keepdim=True)
        truth = case["label"].as_tensor()[None].to(device).round().long()
        c = config.data.num_classes
        dice = compute_dice(one_hot(prediction, c), one_hot(truth, c), include_background=False,
                            ignore_empty=True)
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
) -> Iterator[FinetuneEvent]:
    """Finetune a SwinUNETR, yielding a :class:`FinetuneEvent` per step.

    Args:
        config: validated :class:`FinetuneConfig`; when resuming, the run's own
            (see :func:`finetune_resume_config`); ``train.total_steps`` may grow.
        data: a folder (imagesTr/labelsTr), a Decathlon JSON, or entries with labels.
        run_dir: output folder (default ``config.run.output_dir``).
        pretrained: a VoCo checkpoint (own run or released weights) for the encoder;
            the load report is the ``start`` event's ``message``.
        validation: held-out cases; default: the JSON's ``validation`` section, else
            ``data.val_fraction`` of the training cases (else the training cases).
        resume: a finetuning run folder or its ``last.pt``.
        stop: checked before every step; when set, a checkpoint is written and the
            generator ends with a ``stopped`` event.
    """
    config.validate()
    device = resolve_device(config.run.device)
    run_dir = Path(run_dir or config.run.output_dir)
    t, seed = config.train, config.run.seed
    train_cases = load_labelled_cases(_entries(data, "training"))
    val_entries = list(validation) if validation is not None else _validation_entries(data)
    if val_entries:
        val_cases = load_labelled_cases(val_entries, kind="validation")
    else:
        train_cases, val_cases = split_validation(train_cases, config.data.val_fraction, seed)
    val_source = "validation" if val_cases else "training"
    config = resolve_classes(config, train_cases + val_cases,
                             lambda c: _dataset_class_names(data, c))
    try:
        (run_dir / "checkpoints").mkdir(parents=True, exist_ok=True)
        config.save(run_dir / "config.yaml")
    except OSError as err:
        raise VoCoDataError(f"output folder is not writable ({err.strerror or err})",
                            run_dir) from err

    pre = seg_transforms(config.data)
    train_volumes = [pre({"image": c.image, "label": c.label}) for c in train_cases]
    val_volumes = [pre({"image": c.image, "label": c.label}) for c in (val_cases or train_cases)]
    crop = seg_train_transforms(t)

    torch.manual_seed(seed)
    model = build_swin_unetr(config.model, config.data.num_classes).to(device)
    message = ""
    if pretrained is not None and resume is None:
        message = load_backbone(model, pretrained).summary()
    encoder, decoder = encoder_parameter_groups(model)
    if t.encoder_lr_scale == 0:
        for p in encoder:
            p.requires_grad_(False)
    groups = [{"params": decoder, "lr": t.lr}]
    if t.encoder_lr_scale > 0:
        groups.append({"params": encoder, "lr": t.lr * t.encoder_lr_scale})
    optimizer = torch.optim.AdamW(groups, lr=t.lr, weight_decay=t.weight_decay)
    schedule = warmup_cosine(t.warmup_steps, t.total_steps, t.min_lr / t.lr)

    def encoder_schedule(s: int) -> float:  # frozen (lr 0) for the first freeze_encoder_steps
        return 0.0 if s < t.freeze_encoder_steps else schedule(s)

    def lambdas():
        return [schedule, encoder_schedule][: len(groups)]

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambdas())
    dtype = amp_dtype(t.amp, device)
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    loss_fn = DiceCELoss(to_onehot_y=True, softmax=True)
    step, best_dice, best_step, per_class_best = 0, -math.inf, -1, []
    if resume is not None:
        state = load_finetune_checkpoint(resume, map_location=device)
        if state.get("kind") != "last":
            raise VoCoDataError("is a best-model checkpoint without optimizer state; resume "
                                "from the run folder or its checkpoints/last.pt", resume)
        saved = finetune_config_from_dict(state["config"], check_device=False)
        if saved.model != config.model or saved.data.num_classes != config.data.num_classes:
            raise VoCoConfigError(f"{resume}: the checkpoint's model/classes differ from the "
                                  "config; resume with finetune_resume_config")
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        scheduler.lr_lambdas[:] = lambdas()
        if state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
        _restore_rng(state["rng"], device)
        step, best_dice, best_step = int(state["step"]), float(state["best_dice"]), int(
            state["best_step"])
        message = f"resumed from {resume} at step {step}"

    names = list(config.data.class_names[1:])
    order = iter(ResumableRandomSampler(len(train_volumes), seed, start=step * t.batch_volumes))
    last_path, best_path = run_dir / "checkpoints" / LAST, run_dir / "checkpoints" / BEST
    best_written = best_path if best_path.is_file() and resume is not None else None

    def payload(kind: str) -> dict:
        return {"format": SEG_FORMAT, "kind": kind, "voco_version": __version__, "step": step,
                "config": config.to_dict(), "model": model.state_dict(),
                "best_dice": best_dice, "best_step": best_step}

    def save() -> Path:
        atomic_torch_save({**payload("last"), "optimizer": optimizer.state_dict(),
                           "scheduler": scheduler.state_dict(),
                           "scaler": scaler.state_dict() if scaler.is_enabled() else None,
                           "rng": _rng_state(device)}, last_path)
        write_json(run_dir / "meta.json", {
            "format": SEG_FORMAT, "voco_version": __version__, "step": step,
            "total_steps": t.total_steps, "best_dice": _finite(best_dice),
            "best_step": best_step, "class_dice_at_best": dict(zip(names, per_class_best,
                                                                   strict=False)),
            "validated_on": val_source, "num_classes": config.data.num_classes,
            "class_names": list(config.data.class_names),
            "saved_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")})
        return last_path

    last = FinetuneEvent("start", step, t.total_steps, run_dir=str(run_dir), message=message,
                         best_dice=_finite(best_dice), best_step=best_step)
    saved_step = step if resume is not None else -1
    seconds_per_step = math.nan
    # Process-wide switches and the log last, right before the try whose finally undoes
    # them (an error in set-up or a generator closed after "start" must not leak them).
    log = open(run_dir / "log.jsonl", "a")
    backend_flags = _set_backend_flags(device, config.run.deterministic)
    try:
        yield last
        while step < t.total_steps:
            if stop is not None and stop.is_set():
                if saved_step != step:
                    save()
                    saved_step = step
                last = replace(last, kind="stopped", checkpoint=str(last_path))
                yield last
                return
            started = time.perf_counter()
            model.train()
            crops = []
            for b in range(t.batch_volumes):
                index = next(order)
                crop.set_random_state(seed=int(np.random.default_rng(
                    [seed, step, b]).integers(2**31)))
                with warnings.catch_warnings():  # crops of all-foreground volumes
                    warnings.filterwarnings("ignore", message="Num foregrounds")
                    crops += crop(train_volumes[index])
            images = torch.stack([c["image"] for c in crops]).to(device)
            labels = torch.stack([c["label"] for c in crops]).to(device)
            optimizer.zero_grad(set_to_none=True)
            with torch.autocast(device.type, dtype=dtype or torch.float32,
                                enabled=dtype is not None):
                loss = loss_fn(model(images), labels)
            if not torch.isfinite(loss):
                raise VoCoTrainingError(f"the loss became {loss.item()} at step {step + 1}; the "
                                        "last checkpoint is kept (try a lower train.lr)")
            scaler.scale(loss).backward()
            if t.clip_norm > 0:
                scaler.unscale_(optimizer)
                torch.nn.utils.clip_grad_norm_(model.parameters(), t.clip_norm)
            scaler.step(optimizer)
            scaler.update()
            scheduler.step()
            step += 1

            elapsed = time.perf_counter() - started
            seconds_per_step = elapsed if math.isnan(seconds_per_step) else (
                0.8 * seconds_per_step + 0.2 * elapsed)
            last = replace(last, kind="step", step=step, loss=loss.item(),
                           lr=optimizer.param_groups[0]["lr"], seconds_per_step=elapsed,
                           eta_seconds=seconds_per_step * (t.total_steps - step),
                           peak_memory_bytes=peak_memory_bytes(device), checkpoint=None,
                           message="")
            if step % config.run.log_every == 0 or step == t.total_steps:
                log.write(json.dumps({"step": step, "loss": last.loss, "lr": last.lr}) + "\n")
            if step % t.val_every == 0 or step == t.total_steps:
                yield last
                mean_dice, per_class = validate(model, val_volumes, config, device, dtype)
                if math.isfinite(mean_dice) and mean_dice > best_dice:
                    best_dice, best_step, per_class_best = mean_dice, step, [
                        _finite(d) for d in per_class]
                    best_written = atomic_torch_save(payload("best"), best_path)
                class_dice = dict(zip(names, (_finite(d) for d in per_class), strict=True))
                log.write(json.dumps({"step": step, "mean_dice": _finite(mean_dice),
                                      "class_dice": class_dice, "on": val_source}) + "\n")
                last = replace(last, kind="validation", mean_dice=mean_dice,
                               class_dice=class_dice, best_dice=_finite(best_dice),
                               best_step=best_step,
                               best_checkpoint=str(best_written) if best_written else None)
            log.flush()
            if step % config.run.checkpoint_every == 0 or step == t.total_steps:
                last = replace(last, checkpoint=str(save()))
                saved_step = step
            yield last
        last = replace(last, kind="done")
        yield last
    except BaseException:
        if step > saved_step and step > 0:
            try:  # keep the progress made so far
                save()
            except VoCoDataError:
                pass
        raise
    finally:
        log.close()
        _restore_backend_flags(backend_flags)
        try:
            plot_finetune_curves(run_dir / "log.jsonl", run_dir / "curves.png")
        except (OSError, ValueError):
            pass


def _finite(value: float) -> float | None:
    """JSON-safe: NaN/inf -> None."""
    value = float(value)
    return value if math.isfinite(value) else None


def finetune_resume_config(resume: str | Path, **overrides: Any) -> FinetuneConfig:
    """The config stored in a finetuning run's ``last.pt``, with nested overrides."""
    path = Path(resume)
    if path.is_dir():
        path = path / "checkpoints" / LAST
    state = load_finetune_checkpoint(path)
    return finetune_config_from_dict(merge(state["config"], overrides))


def finetune(config: FinetuneConfig, data, run_dir=None, *, pretrained=None, validation=None,
             resume=None, stop: StopFlag | None = None,
             callback: Callable[[FinetuneEvent], None] | None = None) -> FinetuneResult:
    """Run :func:`iter_finetune` to the end; ``callback`` receives every event."""
    history: list[FinetuneEvent] = []
    for event in iter_finetune(config, data, run_dir, pretrained=pretrained,
                               validation=validation, resume=resume, stop=stop):
        history.append(event)
        if callback is not None:
            callback(event)
    final = history[-1]
    folder = Path(final.run_dir) / "checkpoints"
    return FinetuneResult(Path(final.run_dir), folder / LAST,
                          folder / BEST if (folder / BEST).is_file() else None,
                          final.best_dice, final.step, final.kind == "stopped", history)


def plot_finetune_curves(log_path: str | Path, out_png: str | Path) -> Path | None:
    """Training loss and validation Dice against step (matplotlib, Agg)."""
    records = [json.loads(line) for line in Path(log_path).read_text().splitlines() if line]
    losses = [r for r in records if "loss" in r]
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
    fig.savefig(out_png, dpi=90)
    return Path(out_png)
