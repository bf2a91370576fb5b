"""``voco compare``: does a pretraining help on *your* labelled cases?

The paired evaluation, on the user's data: K folds over the labelled cases (each fold
holds out its cases; the others train), and for each fold and seed two finetunings
that differ only in their encoder's start, from scratch or from the VoCo backbone.
Both arms of a pair get the same seed, hence the same decoder initialisation, the
same training crops and the same held-out cases, so their difference is the
pretraining's effect and not a draw of luck.

Each run validates on its held-out cases every ``val_every`` steps (a learning curve
per class). Two readings of the same runs:

- **final quality**: Dice at the plateau, the mean of each curve's last
  :data:`PLATEAU_POINTS` validations; VoCo - scratch per pair, with 95% t and
  bootstrap intervals, overall and per class. Whether the curves *have* flattened is
  checked and reported per arm and class (the mean curve's last points change by
  less than :data:`FLAT_TOLERANCE`); a curve still rising says "train longer".
- **efficiency**: the finetuning steps each arm needs to reach 90% of scratch's
  plateau Dice of the same pair.

The other design, ``labelled``: Dice against the number of labelled cases. The last
``held_out`` cases are held out for every run; a run with ``n`` labelled cases trains
on the first ``n`` of the others (so a larger set holds the smaller ones, as when a lab
labels more), both arms and every seed alike. Both readings are then made per ``n``.

Everything goes to ``OUT``: ``runs/fold<k>-seed<s>-<arm>/`` (or
``runs/labelled<n>-seed<s>-<arm>/``: ordinary finetuning run folders), ``compare.json``
(settings, every curve, both readings), ``curves.png`` (mean learning curves),
``classes.png`` (per-class difference at the plateau) or, in the labelled design,
``labelled.png`` (plateau Dice against labelled cases). An interrupted comparison
resumes: finished runs are read back, an unfinished one is resumed from its checkpoint.
``jobs`` runs several finetunings at once, each in a spawned process with an equal
share of the CPU threads. ``stop`` (the CLI sets it on Ctrl-C or SIGTERM) stops every
running finetuning after its current step with a checkpoint, starts no other, and
returns the record with ``status: stopped``.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from voco_core.config import merge
from voco_core.data.datalists import DatalistEntry, dataset_class_names, load_datalist
from voco_core.errors import VoCoConfigError, VoCoDataError
from voco_core.evaluation.figures import plot_comparison, plot_labelled
from voco_core.evaluation.stats import paired_difference, spread
from voco_core.outputs import write_json
from voco_core.run_folder import RunFolder, read_log
from voco_core.train.common import StopFlag

ARMS = ("scratch", "voco")
PLATEAU_POINTS = 3
"""Validations at the end of a curve averaged into its plateau Dice."""
FLAT_TOLERANCE = 0.01
"""A mean curve whose last :data:`PLATEAU_POINTS` validations differ from the
:data:`PLATEAU_POINTS` before by less than this (Dice) has flattened."""
DEFAULT_HELD_OUT = 2
"""Cases the labelled design holds out when ``held_out`` is not given."""
EFFICIENCY_FRACTION = 0.9
"""The efficiency reading: steps to reach this fraction of scratch's plateau Dice."""


@dataclass
class CompareSettings:
    """What one comparison runs. ``overrides``: nested finetuning config overrides
    (``--set``), applied to both arms alike; ``steps``/``val_every``: ``None`` keeps
    the preset's ``train.total_steps`` and a tenth of it."""

    folds: int | None = None
    labelled: tuple[int, ...] = ()
    """The labelled design (see the module doc): labelled cases per run, e.g. (1, 2, 4,
    8); empty: K folds."""
    held_out: int | None = None
    """Cases held out for every run of the labelled design (None:
    :data:`DEFAULT_HELD_OUT`)."""
    seeds: int = 1
    first_seed: int = 0
    """Seeds ``first_seed .. first_seed + seeds - 1``: a comparison split over machines
    (each its own ``--out``) or extended with seeds later; the run folders of the parts,
    copied into one ``--out`` with the whole range, are read back there."""
    jobs: int = 1
    """Runs at once, each in its own process with an equal share of the CPU threads."""
    steps: int | None = None
    val_every: int | None = None
    preset: str | None = None
    overrides: dict = field(default_factory=dict)


def k_folds(cases: Sequence[DatalistEntry], folds: int) -> list[tuple[list, list]]:
    """``(training, held_out)`` case lists of each of ``folds`` folds: the cases in
    datalist order dealt round-robin, so every case is held out exactly once and fold
    sizes differ by at most one. Needs ``2 <= folds <= len(cases)``."""
    if len(cases) < 2:
        raise VoCoDataError(f"voco compare needs at least 2 labelled cases (one to train on, "
                            f"one held out), found {len(cases)}")
    if not 2 <= folds <= len(cases):
        raise VoCoConfigError(f"--folds {folds}: expected 2 to {len(cases)} (the number of "
                              "labelled cases)")
    held = [[case for i, case in enumerate(cases) if i % folds == k] for k in range(folds)]
    return [([c for c in cases if c not in out], out) for out in held]


def labelled_splits(cases: Sequence[DatalistEntry], counts: Sequence[int],
                    held_out: int) -> list[tuple[list, list]]:
    """``(training, held_out)`` per count of ``counts``: the last ``held_out`` cases are
    held out for all; ``n`` labelled train on the first ``n`` of the others."""
    if held_out < 1:
        raise VoCoConfigError(f"--held-out {held_out}: expected at least 1")
    if not counts or min(counts) < 1:
        raise VoCoConfigError(f"--labelled {list(counts)}: expected counts of at least 1")
    if len(cases) < held_out + max(counts):
        raise VoCoDataError(f"--labelled {max(counts)} with --held-out {held_out} needs "
                            f"{held_out + max(counts)} labelled cases, found {len(cases)}")
    pool, held = list(cases[:-held_out]), list(cases[-held_out:])
    return [(pool[:n], held) for n in counts]


def run_key(fold: int, seed: int, arm: str, labelled: int | None = None) -> str:
    """A run's name: ``fold<k>-seed<s>-<arm>``, or ``labelled<n>-seed<s>-<arm>``."""
    split = f"fold{fold}" if labelled is None else f"labelled{labelled}"
    return f"{split}-seed{seed}-{arm}"


def compare(data: str | Path, pretrained: str | Path, out: str | Path,
            settings: CompareSettings | None = None,
            say: Callable[[str], None] = print,
            stop: StopFlag | None = None) -> dict[str, Any]:
    """Run (or resume) the paired comparison; returns what ``compare.json`` holds
    (``status``: ``finished``, or ``stopped`` when ``stop`` was set before the end)."""
    settings = settings or CompareSettings()
    out = Path(out)
    pretrained = Path(pretrained)
    if not pretrained.exists():
        raise VoCoDataError("pretrained checkpoint or run folder not found", pretrained)
    settings, record, planned = _plan(data, out, settings, pretrained)
    counts, total = tuple(settings.labelled), record["total_steps"]

    def keep(run: _Run, curve: list[dict] | None) -> None:
        if curve is None:
            raise VoCoDataError("the run ended without its last validation", run.run_dir)
        record["runs"][run.key] = {"fold": run.fold, "seed": run.seed, "arm": run.arm,
                                   **({"labelled": counts[run.fold]} if counts else {}),
                                   "curve": curve}
        write_json(out / "compare.json", record)  # resumable after every run

    def finished(run: _Run) -> None:
        keep(run, _finished_curve(run.run_dir, total))
        say(f"{run.key}: finished, plateau Dice "
            f"{plateau(record['runs'][run.key]['curve']):.3f}")

    todo = []
    for run in planned:
        curve = _finished_curve(run.run_dir, total)
        if curve is None:
            todo.append(run)
        else:  # finished before an interruption: read back, not rerun
            keep(run, curve)
    if len(todo) < len(planned):
        say(f"{len(planned) - len(todo)} of {len(planned)} runs finished before: read back")
    if not _run_all(todo, settings, finished, say, stop):
        record["status"] = "stopped"  # the finished runs are in compare.json already
        say(f"stopped: {len(record['runs'])} of {len(planned)} runs finished; the same "
            "command resumes (a stopped run continues from its checkpoint)")
        return record
    record["status"] = "finished"
    record["runs"] = {run.key: record["runs"][run.key] for run in planned}  # in plan order
    if counts:  # both readings per number of labelled cases
        record["by_labelled"] = {
            str(n): summarise({"runs": {key: r for key, r in record["runs"].items()
                                        if r["fold"] == k}})
            for k, n in enumerate(counts)}
        write_json(out / "compare.json", record)
        plot_labelled(record, out / "curves.png", out / "labelled.png")
    else:
        record.update(summarise(record))
        write_json(out / "compare.json", record)
        plot_comparison(record, out / "curves.png", out / "classes.png")
    return record


def _plan(data: str | Path, out: Path, settings: CompareSettings,
          pretrained: Path | None) -> tuple[CompareSettings, dict[str, Any], list[_Run]]:
    """Check the settings and plan every run: the settings with the dataset's class
    names, the record's skeleton, the runs in order. ``pretrained`` None: only the
    scratch arms are wanted (no backbone yet, nothing to check it against)."""
    from voco_core.config import make_finetune_config
    from voco_core.plan import default_preset

    cases = load_datalist(data, section="training", require_labels=True)
    counts = tuple(settings.labelled)
    if counts and settings.folds:
        raise VoCoConfigError("--folds and --labelled are two designs: give one of them")
    if settings.held_out is not None and not counts:
        raise VoCoConfigError(f"--held-out {settings.held_out} goes with --labelled (the "
                              "K-fold design holds out each fold in turn)")
    folds = (labelled_splits(cases, counts, settings.held_out or DEFAULT_HELD_OUT) if counts
             else k_folds(cases, settings.folds or min(5, len(cases))))
    declared = dataset_class_names(data)  # each run gets its cases, not the dataset.json
    if declared:
        settings = replace(settings, overrides=merge(
            {"data": {"num_classes": len(declared), "class_names": list(declared)}},
            settings.overrides))
    if settings.seeds < 1:
        raise VoCoConfigError(f"--seeds {settings.seeds}: expected at least 1")
    if settings.first_seed < 0:
        raise VoCoConfigError(f"--first-seed {settings.first_seed}: expected 0 or more")
    if settings.jobs < 1:
        raise VoCoConfigError(f"--jobs {settings.jobs}: expected at least 1")
    digest = None if pretrained is None else _same_backbone(pretrained, out / "compare.json")
    device = str((settings.overrides.get("run") or {}).get("device", "auto"))
    config = make_finetune_config(settings.preset or default_preset(device)[0],
                                  _overrides(settings, 0))  # bad settings: before any run
    record: dict[str, Any] = {
        "data": str(data), "pretrained": str(pretrained), "pretrained_sha256": digest,
        "preset": config.preset,
        "design": "labelled" if counts else "folds", "folds": len(folds),
        **({"labelled": list(counts)} if counts else {}),
        "seeds": settings.seeds,
        **({"first_seed": settings.first_seed} if settings.first_seed else {}),
        "total_steps": config.train.total_steps,
        "val_every": config.train.val_every, "overrides": settings.overrides,
        "held_out": [[str(c.image_file.name) for c in held] for _, held in folds],
        "runs": {}}
    planned = []
    for k, (training, held) in enumerate(folds):
        for seed in range(settings.first_seed, settings.first_seed + settings.seeds):
            for arm in ARMS:
                key = run_key(k, seed, arm, counts[k] if counts else None)
                planned.append(_Run(key, k, seed, arm, out / "runs" / key, training, held,
                                    pretrained if arm == "voco" else None))
    return settings, record, planned


def scratch_arms(data: str | Path, out: str | Path,
                 settings: CompareSettings | None = None) -> list[tuple[_Run, CompareSettings]]:
    """The comparison's scratch arms not finished yet in ``out``, each with the settings
    to run it by (:func:`run_scratch_arm`). They need no backbone, so they can run
    while the pretraining still does; :func:`compare` then reads them back."""
    settings, record, planned = _plan(data, Path(out), settings or CompareSettings(), None)
    return [(run, settings) for run in planned if run.arm == "scratch"
            and _finished_curve(run.run_dir, record["total_steps"]) is None]


def run_scratch_arm(run: _Run, settings: CompareSettings) -> str:
    """Run (or resume) one of :func:`scratch_arms` in this process; returns its key."""
    if not _run_arm(run.run_dir, run.training, run.held, settings, run.seed, None):
        raise VoCoDataError("the scratch arm stopped before its last step", run.run_dir)
    return run.key


def _same_backbone(pretrained: Path, recorded: Path) -> str:
    """The judged checkpoint's sha256 (16 hex digits), refused when a comparison that
    started in this folder judged another one: a run folder's ``last.pt`` moves on
    while its pretraining continues, and VoCo arms from two backbones are no pairs."""
    import json

    from voco_core.checkpoint import file_digest, find_checkpoint

    checkpoint = find_checkpoint(pretrained)
    mine = file_digest(checkpoint)
    try:  # written atomically; an unreadable one holds nothing to check against
        before = json.loads(recorded.read_text()).get("pretrained_sha256")
    except (OSError, ValueError, AttributeError):
        before = None
    if before and before != mine:
        raise VoCoDataError(
            f"this comparison began with another backbone (sha256 {before}, now {mine}: "
            "has the pretraining gone on since?); give the checkpoint it began with, or a "
            "new --out", checkpoint)
    return mine


@dataclass(frozen=True)
class _Run:
    """One finetuning of the comparison: ``arm`` of ``seed`` in fold ``fold``."""

    key: str
    fold: int
    seed: int
    arm: str
    run_dir: Path
    training: list
    held: list
    pretrained: Path | None


def _run_all(todo: list[_Run], settings: CompareSettings, done: Callable[[_Run], None],
             say: Callable[[str], None], stop: StopFlag | None) -> bool:
    """Run ``todo``, ``settings.jobs`` at a time (each in a spawned process then), and
    call ``done`` with each as it finishes. False when ``stop`` ended it early."""
    def announce(run: _Run, queued: bool = False) -> None:
        say(f"{run.key}: {'queued, ' if queued else ''}finetuning on {len(run.training)} "
            f"case(s), validating on {len(run.held)} held out")

    if settings.jobs == 1 or len(todo) < 2:
        for run in todo:
            if stop is not None and stop.is_set():
                return False
            announce(run)
            if not _run_arm(run.run_dir, run.training, run.held, settings, run.seed,
                            run.pretrained, stop):
                return False
            done(run)
        return True
    import multiprocessing
    from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait

    import torch

    threads = max(1, torch.get_num_threads() // settings.jobs)
    context = multiprocessing.get_context("spawn")
    workers_stop = context.Event()  # the workers' stop flag; this process relays ``stop``
    with ProcessPoolExecutor(settings.jobs, mp_context=context, initializer=_start_worker,
                             initargs=(threads, workers_stop)) as pool:
        running = {}
        try:
            say(f"{len(todo)} runs, {settings.jobs} at a time ({threads} thread(s) each)")
            for run in todo:
                announce(run, queued=True)
                running[pool.submit(_run_arm, run.run_dir, run.training, run.held, settings,
                                    run.seed, run.pretrained)] = run
            while running:
                finished, _ = wait(running, timeout=0.5, return_when=FIRST_COMPLETED)
                if stop is not None and stop.is_set():
                    workers_stop.set()
                for future in finished:
                    if future.result():  # a run's error ends the comparison, as inline
                        done(running.pop(future))
                    else:  # stopped, or never started after the stop
                        running.pop(future)
            return not workers_stop.is_set()
        except BaseException:
            # Runs already handed to a worker cannot be cancelled: the flag makes the
            # running ones stop after their step (with a checkpoint), the others not start.
            workers_stop.set()
            pool.shutdown(wait=True, cancel_futures=True)
            raise


def _overrides(settings: CompareSettings, seed: int) -> dict:
    train: dict[str, Any] = {}
    if settings.steps is not None:
        train["total_steps"] = settings.steps
    if settings.val_every is not None:
        train["val_every"] = settings.val_every
    elif settings.steps is not None:
        train["val_every"] = max(1, settings.steps // 10)
    return merge(settings.overrides, {"train": train, "run": {"seed": seed}})


_WORKER_STOP: StopFlag | None = None
"""In a worker process of :func:`_run_all`: the flag the parent sets to stop."""


def _start_worker(threads: int, stop: StopFlag) -> None:
    """A worker's set-up: its share of the threads, the parent's stop flag, and no
    Ctrl-C of its own (a terminal sends it to the whole group: the parent decides)."""
    import signal

    import torch

    global _WORKER_STOP
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    torch.set_num_threads(threads)
    _WORKER_STOP = stop


def _run_arm(run_dir: Path, training: list, held: list, settings: CompareSettings,
             seed: int, pretrained: Path | None, stop: StopFlag | None = None) -> bool:
    """One finetuning, new or resumed; True when it reached its last step, False when
    ``stop`` (in a worker: the parent's flag) ended it or kept it from starting."""
    from voco_core.plan import plan_finetune
    from voco_core.train.finetune import iter_finetune

    stop = stop if stop is not None else _WORKER_STOP
    if stop is not None and stop.is_set():
        return False

    folder = RunFolder(run_dir)
    if folder.last.is_file():  # interrupted: go on from its checkpoint
        plan = plan_finetune(resume=run_dir)
        pretrained = None
    else:  # nothing usable yet (a run that failed before its first checkpoint)
        plan = plan_finetune(preset=settings.preset, overrides=_overrides(settings, seed),
                             out=run_dir, pretrained=pretrained, overwrite=True)
    ended = "none"
    for event in iter_finetune(plan.config, training, plan.run_dir, pretrained=plan.pretrained,
                               validation=held, resume=plan.resume, stop=stop):
        ended = event.kind
    return ended == "done"


def _finished_curve(run_dir: Path, total: int) -> list[dict] | None:
    """The held-out validations of a finished run, ``[{step, mean, classes}]``; None
    for a run that has not reached its last step."""
    folder = RunFolder(run_dir)
    if not folder.log.is_file():
        return None
    points = [{"step": r["step"], "mean": r["mean_dice"], "classes": r.get("class_dice") or {}}
              for r in read_log(folder.log) if r.get("mean_dice") is not None]
    if not points or points[-1]["step"] < total:
        return None
    return points


# --------------------------------------------------------------------------- readings


def plateau(curve: list[dict], key: str | None = None) -> float:
    """Mean Dice (``key``: one class's) over the last :data:`PLATEAU_POINTS` points."""
    values = [_value(p, key) for p in curve[-PLATEAU_POINTS:]]
    values = [v for v in values if math.isfinite(v)]
    return statistics.fmean(values) if values else math.nan


def steps_to_reach(curve: list[dict], target: float) -> int | None:
    """The first validated step whose mean Dice reaches ``target``; None if none does."""
    return next((p["step"] for p in curve if p["mean"] >= target), None)


def _value(point: dict, key: str | None) -> float:
    value = point["mean"] if key is None else point["classes"].get(key)
    return float(value) if value is not None else math.nan


def summarise(record: dict) -> dict[str, Any]:
    """Both readings (see the module doc) from ``record["runs"]``."""
    curves = {(r["fold"], r["seed"], r["arm"]): r["curve"] for r in record["runs"].values()}
    units = sorted({(k, s) for k, s, _ in curves})
    pairs = [(curves[k, s, "scratch"], curves[k, s, "voco"]) for k, s in units]
    classes = sorted({c for scratch, voco in pairs for p in scratch + voco for c in p["classes"]})
    final = paired_difference([plateau(v) for _, v in pairs], [plateau(s) for s, _ in pairs])
    per_class = {}
    for name in classes:
        both = [(plateau(s, name), plateau(v, name)) for s, v in pairs]
        both = [(a, b) for a, b in both if math.isfinite(a) and math.isfinite(b)]
        per_class[name] = {
            "scratch": spread([a for a, _ in both]), "voco": spread([b for _, b in both]),
            "difference": paired_difference([b for _, b in both], [a for a, _ in both])}
    reached = {arm: [] for arm in ARMS}
    for scratch, voco in pairs:
        target = EFFICIENCY_FRACTION * plateau(scratch)
        reached["scratch"].append(steps_to_reach(scratch, target))
        reached["voco"].append(steps_to_reach(voco, target))
    both_reached = [(a, b) for a, b in zip(reached["scratch"], reached["voco"], strict=True)
                    if a is not None and b is not None]
    return {
        "final_quality": {"scratch": spread([plateau(s) for s, _ in pairs]),
                          "voco": spread([plateau(v) for _, v in pairs]),
                          "difference": final, "per_class": per_class},
        "efficiency": {
            "fraction_of_scratch_plateau": EFFICIENCY_FRACTION,
            "steps": {arm: reached[arm] for arm in ARMS},
            "steps_saved_by_voco": paired_difference([a for a, _ in both_reached],
                                                     [b for _, b in both_reached]),
            "voco_never_reached": sum(b is None for b in reached["voco"])},
        "flattened": {arm: flatness([p[ARMS.index(arm)] for p in pairs], classes)
                      for arm in ARMS},
    }


def flatness(curves: list[list[dict]], classes: list[str]) -> dict[str, Any]:
    """Whether the mean curve of ``curves`` (the runs of one arm) has flattened, overall
    and per class: its last :data:`PLATEAU_POINTS` points against the ones before."""
    def change(key: str | None) -> float:
        steps = sorted({p["step"] for c in curves for p in c})
        mean_curve = []
        for step in steps:
            values = [_value(p, key) for c in curves for p in c if p["step"] == step]
            values = [v for v in values if math.isfinite(v)]
            mean_curve.append(statistics.fmean(values) if values else math.nan)
        if len(mean_curve) < 2 * PLATEAU_POINTS:
            return math.nan  # too few validations to tell
        last = statistics.fmean(mean_curve[-PLATEAU_POINTS:])
        before = statistics.fmean(mean_curve[-2 * PLATEAU_POINTS:-PLATEAU_POINTS])
        return last - before

    overall = change(None)
    rising = [name for name in classes
              if not (abs(change(name)) < FLAT_TOLERANCE)]  # NaN counts as not flat
    return {"mean_change": None if math.isnan(overall) else round(overall, 4),
            "flat": bool(abs(overall) < FLAT_TOLERANCE and not rising),
            "classes_not_flat": rising}


def headline(record: dict) -> str:
    """The one line ``voco compare`` ends with."""
    seeds = f"{record['seeds']} seed{'s' if record['seeds'] > 1 else ''}"
    if record.get("design") == "labelled":
        readings = record["by_labelled"].values()
        parts = [f"{n} labelled {_difference(r)}" for n, r in record["by_labelled"].items()]
        return (f"VoCo - scratch at the plateau: {'; '.join(parts)} ({seeds}, "
                f"{len(record['held_out'][0])} held out)" + _train_longer(readings))
    return (f"VoCo - scratch at the plateau: {_difference(record)} over {record['folds']} "
            f"folds ({seeds})" + _train_longer([record]))


def _difference(reading: dict) -> str:
    d = reading["final_quality"]["difference"]
    lo, hi = d.get("ci95_t", [None, None])
    interval = (f"[{lo:+.3f}, {hi:+.3f}]" if lo is not None and hi is not None
                else "[no interval: one pair]")
    return f"{d['mean']:+.3f} Dice {interval}"


def _train_longer(readings) -> str:
    flat = all(r["flattened"][arm]["flat"] for r in readings for arm in ARMS)
    return "" if flat else "; the curves have not flattened: train longer (--steps)"
