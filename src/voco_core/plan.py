"""Planning a training run: the one place where a preset, a config file, a resume
target, overrides and an output folder become a validated config and a run folder.

The CLI (``voco pretrain``/``finetune``/``demo``) and the napari widgets both plan
with :func:`plan_pretrain`/:func:`plan_finetune`, then run the plan::

    plan = plan_pretrain(preset="tiny", overrides={"optim": {"total_steps": 100}},
                         out=Path("runs/a"))
    for event in iter_pretrain(plan.config, data, plan.run_dir, resume=plan.resume):
        ...

Resuming continues with the run's own config (from its checkpoint) in the run's own
folder: ``resume`` may be the run folder or a checkpoint inside it, so
``voco finetune --resume RUN/checkpoints/last.pt`` writes to ``RUN``.

A new run (not a resume) never starts in a folder that holds a run
(:func:`claim_run_folder`): planning refuses with :class:`ExistingRunError`, or, with
``overwrite=True``, moves the old run aside to ``RUN.old-<time>`` (never deletes it).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from voco_core.checkpoint import (
    find_checkpoint,
    find_segmentation_checkpoint,
    load_pretrain_checkpoint,
    load_segmentation_checkpoint,
    require_resumable,
    saved_config,
)
from voco_core.config import (
    FinetuneConfig,
    PretrainConfig,
    finetune_config_from_dict,
    load_finetune_config,
    load_pretrain_config,
    make_finetune_config,
    make_pretrain_config,
    merge,
    pretrain_config_from_dict,
)
from voco_core.errors import ExistingRunError, VoCoConfigError, VoCoDataError
from voco_core.run_folder import RunFolder


@dataclass(frozen=True)
class RunPlan:
    """A validated run: ``config.run.output_dir == str(run_dir)``; ``resume`` is the
    checkpoint file to continue from; ``notes`` are one-line remarks for the user."""

    kind: Literal["pretrain", "finetune"]
    config: PretrainConfig | FinetuneConfig
    run_dir: Path
    resume: Path | None
    pretrained: Path | None = None
    notes: tuple[str, ...] = ()
    initial: Path | None = None
    """finetune: the finetuned checkpoint whose whole network starts this new run
    (:func:`plan_continue`); its run is recorded as the parent in ``meta.json``."""


def default_preset(device: str = "auto") -> tuple[str, str]:
    """(preset, note) when none is given: ``base`` on a CUDA device (``device`` names
    one, or is ``auto`` and CUDA is available), else ``tiny``. The CLI and both
    training widgets choose with this."""
    import torch

    cuda = device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())
    if cuda:
        return "base", "preset: base (no preset given; CUDA)"
    return "tiny", "preset: tiny (no preset given; no CUDA)"


DEFAULT_RUNS_FOLDER = Path("runs")
"""Where new runs go when no output folder is given (the CLI: relative to the working
directory; the napari widgets pass ``~/napari-voco/runs``, since napari's working
directory may be anywhere)."""


def default_run_dir(kind: str, base: Path | None = None) -> Path:
    """``<base>/<kind>-<YYYYmmdd-HHMMSS>`` (``base``: :data:`DEFAULT_RUNS_FOLDER`): a new
    folder for each new run when none is given, so a repeated command never meets its
    previous run."""
    import time

    return (base or DEFAULT_RUNS_FOLDER) / f"{kind}-{time.strftime('%Y%m%d-%H%M%S')}"


def plan_pretrain(*, preset: str | None = None, config_file: Path | None = None,
                  resume: Path | None = None, overrides: dict | None = None,
                  out: Path | None = None, overwrite: bool = False) -> RunPlan:
    """Plan ``voco pretrain``: the run's own config when resuming, else the config file,
    else the preset; then ``overrides`` (nested dicts) and the output folder. A new run
    in a folder holding a run: see :func:`claim_run_folder`."""
    return _plan("pretrain", preset, config_file, resume, overrides, out, None, overwrite)


def plan_finetune(*, preset: str | None = None, config_file: Path | None = None,
                  resume: Path | None = None, overrides: dict | None = None,
                  out: Path | None = None, pretrained: Path | None = None,
                  overwrite: bool = False) -> RunPlan:
    """Plan ``voco finetune`` like :func:`plan_pretrain`; ``pretrained`` is the VoCo
    checkpoint (run folder or file) for the encoder of a new run."""
    return _plan("finetune", preset, config_file, resume, overrides, out, pretrained,
                 overwrite)


def plan_continue(parent: Path, *, overrides: dict | None = None,
                  out: Path | None = None, overwrite: bool = False) -> RunPlan:
    """Plan a new finetuning run that continues from ``parent`` (a finetuning run
    folder: its ``best.pt``, else ``last.pt``; or one of those files): the parent's
    config (classes, ignore label, model, pre-processing) and whole network, new
    labels, a new run folder (default: ``PARENT_r2``, ``PARENT_r3``, ... the first
    free one) and a fresh schedule of ``train.total_steps`` steps. This is the
    correct-and-retrain loop: it does not restart from the backbone."""
    parent = Path(parent)
    checkpoint = find_segmentation_checkpoint(parent)
    state = load_segmentation_checkpoint(checkpoint)
    config = saved_config(state, "finetune", checkpoint).to_dict()
    folder = RunFolder.of(checkpoint)
    if out is None:
        out = next_round_folder(folder.root if folder is not None else checkpoint.parent)
    config = _from_dict("finetune", merge(config, _with_output(dict(overrides or {}), out)))
    run_dir = Path(config.run.output_dir)
    notes = claim_run_folder(run_dir, overwrite, keep={"the run it continues": checkpoint})
    notes.append(f"continuing from {checkpoint} (step {state.get('step')})")
    return RunPlan("finetune", config, run_dir, None, None, tuple(notes), initial=checkpoint)


def claim_run_folder(run_dir: Path, overwrite: bool = False,
                     keep: dict[str, Path | None] | None = None) -> list[str]:
    """Make sure a new run can start in ``run_dir`` without destroying anything.

    A folder that holds a run (:meth:`RunFolder.holds_run`: a config, log, meta.json
    or checkpoint) is refused with :class:`ExistingRunError` naming it, unless
    ``overwrite``: then it is moved aside to ``RUN.old-<time>`` and a note says where.
    ``keep`` names inputs of the new run (``{"the pretrained checkpoint": path}``):
    a folder holding one of them is never moved, even with ``overwrite``. Returns the
    notes for the user (empty when the folder was free)."""
    folder = RunFolder(run_dir)
    if not folder.holds_run():
        return []
    for what, path in (keep or {}).items():
        if path is not None and folder.contains(path):
            raise VoCoConfigError(f"--out {run_dir} holds {what} ({path}); a new run needs "
                                  "another output folder")
    if not overwrite:
        raise ExistingRunError("already holds a run; resume it with --resume "
                               f"{run_dir}, or choose another --out (--overwrite moves the "
                               "old run aside instead)", run_dir)
    moved = folder.move_aside()
    return [f"moved the run that was in {run_dir} aside to {moved}"]


def next_round_folder(parent_root: Path) -> Path:
    """``RUN_r2`` for ``RUN`` (``RUN_r3`` for ``RUN_r2``, ...): the first that does not
    exist yet, beside the parent."""
    stem, _, number = parent_root.name.rpartition("_r")
    base, start = (stem, int(number) + 1) if stem and number.isdigit() else (
        parent_root.name, 2)
    index = start
    while (parent_root.parent / f"{base}_r{index}").exists():
        index += 1
    return parent_root.parent / f"{base}_r{index}"


def _v2_batch_note(config: PretrainConfig) -> list[str]:
    """The v2 loss pairs each volume with its neighbour in the micro-batch: with one
    volume per micro-batch (tiny's default; with auto, a step of one volume) that is
    the volume itself, and the inter-volume term becomes a second intra-volume term."""
    batch = config.optim.batch_size
    if batch == "auto":  # auto keeps v2's pairs when a step has 2 volumes
        per_step, accumulated = config.preset_split()
        batch = min(2, per_step * accumulated)
    if config.loss.variant != "v2" or batch != 1:
        return []
    return ["loss.variant v2 with 1 volume per micro-batch: its inter-volume term pairs "
            "each volume with itself; set optim.batch_size >= 2 for the spec's pairing"]


def _plan(kind: Literal["pretrain", "finetune"], preset: str | None,
          config_file: Path | None, resume: Path | None, overrides: dict | None,
          out: Path | None, pretrained: Path | None, overwrite: bool = False) -> RunPlan:
    overrides = dict(overrides or {})
    notes: list[str] = []
    if resume is not None:
        for name, value in (("preset", preset), ("config file", config_file)):
            if value is not None:
                raise VoCoConfigError(
                    f"{name} {value}: a resumed run continues with its own config; pass "
                    "changes as overrides (--set/--steps/--device) instead")
        resume = find_checkpoint(resume)
        folder = RunFolder.of(resume)
        saved = _saved_config(kind, resume)
        if out is None:
            out = folder.root if folder is not None else Path(saved["run"]["output_dir"])
        config = _from_dict(kind, merge(saved, _with_output(overrides, out)))
        if pretrained is not None:
            notes.append(f"pretrained {pretrained} not loaded: the resumed run has its weights")
            pretrained = None
    elif config_file is not None:
        if preset is not None:
            raise VoCoConfigError(f"preset {preset} and config file {config_file}: give one "
                                  "(the config file names its own preset)")
        loaded = (load_pretrain_config if kind == "pretrain" else load_finetune_config)(
            config_file, check_device=False)
        values = loaded.to_dict()
        config = _from_dict(kind, merge(values, _with_output(
            overrides, out if out is not None else Path(values["run"]["output_dir"]))))
    else:
        if preset is None:
            preset, note = default_preset(str((overrides.get("run") or {}).get("device",
                                                                               "auto")))
            notes.append(note)
        make = make_pretrain_config if kind == "pretrain" else make_finetune_config
        if out is None:  # an explicit --set run.output_dir, else a new folder
            named = (overrides.get("run") or {}).get("output_dir")
            out = Path(named) if named else default_run_dir(kind)
        config = make(preset, _with_output(overrides, out))
    if pretrained is not None and not Path(pretrained).exists():
        raise VoCoDataError("pretrained checkpoint not found", pretrained)
    if kind == "pretrain":
        notes += _v2_batch_note(config)
    run_dir = Path(config.run.output_dir)
    if resume is None:
        notes += claim_run_folder(run_dir, overwrite,
                                  keep={"the pretrained checkpoint": pretrained})
    return RunPlan(kind, config, run_dir, resume,
                   Path(pretrained) if pretrained is not None else None, tuple(notes))


def _with_output(overrides: dict[str, Any], out: Path) -> dict[str, Any]:
    return merge(overrides, {"run": {"output_dir": str(out)}})


def _from_dict(kind: str, values: dict[str, Any]) -> PretrainConfig | FinetuneConfig:
    return (pretrain_config_from_dict if kind == "pretrain" else finetune_config_from_dict)(values)


def _saved_config(kind: Literal["pretrain", "finetune"], checkpoint: Path) -> dict[str, Any]:
    """The config dict stored in a resumable checkpoint of the right kind."""
    load = load_pretrain_checkpoint if kind == "pretrain" else load_segmentation_checkpoint
    state = load(checkpoint)
    if kind == "finetune":
        require_resumable(state, kind, checkpoint)
    return saved_config(state, kind, checkpoint).to_dict()
