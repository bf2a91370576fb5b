"""Phantom populations, the pretraining run, finetuning runs, and the results file.

The results file is rewritten (atomically) after every finished finetuning run, so an
interrupted evaluation still yields its paired numbers, and ``--resume-results``
skips the runs it already holds.
"""

from __future__ import annotations

import json
import math
import os
import platform
import shutil
import statistics
import sys
import time
from pathlib import Path

from .settings import POPULATION_SEEDS


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def import_package(*modules: str, threads: int | None = None) -> None:
    """Import the package (and ``modules``) up front, so one consistent version serves
    the whole run (a lazy import an hour in could meet a source tree edited meanwhile),
    then set torch's CPU threads."""
    import importlib

    import torch

    for name in ("voco_core", "voco_core.checkpoint", "voco_core.data.io",
                 "voco_core.train.finetune", "voco_core.train.pretrain", *modules):
        importlib.import_module(name)
    if threads:
        torch.set_num_threads(threads)


def report_header(benchmark: str, args, work: Path, temporary: bool,
                  skip: tuple[str, ...] = ()) -> dict:
    """The fields every results file starts with: what ran, where, on what machine,
    with which settings (``args`` minus ``skip``)."""
    import monai
    import numpy as np
    import torch

    import voco_core

    return {
        "benchmark": benchmark, "status": "running",
        "work": None if temporary else str(work.resolve()),
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
        "started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                    "python": platform.python_version(), "torch": torch.__version__,
                    "monai": monai.__version__, "numpy": np.__version__,
                    "voco_core": getattr(voco_core, "__version__", None),
                    "voco_core_path": str(Path(voco_core.__file__).parent),
                    "threads": torch.get_num_threads(),
                    "loadavg_at_start": [round(x, 2) for x in os.getloadavg()],
                    "cuda": (torch.cuda.get_device_name(0)
                             if torch.cuda.is_available() else None)},
        "settings": {k: (list(v) if isinstance(v, tuple) else
                         str(v) if isinstance(v, Path) else v)
                     for k, v in vars(args).items() if k not in skip},
    }


def heldout_entries(folder: Path, n: int) -> list:
    """The ``n`` held-out (image, label) pairs of a population folder."""
    from voco_core.data.datalists import DatalistEntry

    return [DatalistEntry(folder / "imagesTr" / f"phantom_{i:03d}.nii.gz",
                          folder / "labelsTr" / f"phantom_{i:03d}.nii.gz") for i in range(n)]


def write_json_atomic(path: Path, data: dict) -> None:
    """Write to a temporary file beside ``path``, then rename: never half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=1) + "\n")
    os.replace(tmp, path)


# ---------------------------------------------------------------- phantoms


def make_populations(args, work: Path) -> dict[str, Path]:
    """The phantom populations in ``work``: pretrain, heldout and pool (classic style),
    and with section ``plateau`` its labelled varied-style population; a folder
    already holding the same population (same n, seed, shape, style) is reused."""
    from voco_core.data.phantoms import make_phantom_dataset

    populations = [("pretrain", args.n_pretrain, args.phantom_shape, "classic"),
                   ("heldout", args.n_heldout, args.phantom_shape, "classic"),
                   ("pool", args.n_pool, args.phantom_shape, "classic")]
    if "plateau" in getattr(args, "sections", ()):  # other benchmarks: no sections
        populations.append(("plateau", args.plateau_cases, args.plateau_shape, "varied"))
    folders = {}
    for name, n, shape, style in populations:
        folder = work / name
        recipe = {"n": n, "seed": POPULATION_SEEDS[name], "shape": list(shape)}
        if style != "classic":  # the classic populations' markers predate styles
            recipe["style"] = style
        marker = folder / "population.json"
        if not (marker.is_file() and json.loads(marker.read_text()) == recipe):
            shutil.rmtree(folder, ignore_errors=True)
            make_phantom_dataset(folder, n=n, seed=recipe["seed"], shape=tuple(shape),
                                 style=style)
            marker.write_text(json.dumps(recipe))
        folders[name] = folder
    return folders


# ---------------------------------------------------------------- pretraining


def loss_terms(record: dict) -> dict[str, float]:
    """The loss terms of one ``log.jsonl`` record: a ``terms`` dict where the library
    logs one, else the flat ``pos``/``neg``/``reg`` keys of the v1 loss."""
    if isinstance(record.get("terms"), dict):
        return {k: float(v) for k, v in record["terms"].items() if v is not None}
    return {k: float(record[k]) for k in ("pos", "neg", "reg") if record.get(k) is not None}


def pretraining_record(run_dir: Path, seconds: float, kept: dict[int, str]) -> dict:
    """Loss curve, terms, time per step and memory of a finished run, from its log."""
    from voco_core.train.pretrain import read_log

    records = read_log(run_dir / "log.jsonl")
    walls = [r["seconds_per_step"] for r in records[1:]] or [math.nan]
    terms = sorted({k for r in records for k in loss_terms(r)})
    curve = {"loss": [round(float(r["loss"]), 5) for r in records],
             "lr": [float(r["lr"]) for r in records]}
    for key in terms:
        curve[key] = [round(loss_terms(r).get(key, math.nan), 5) for r in records]
    window = max(1, len(records) // 10)
    return {
        "checkpoint": str(run_dir / "checkpoints" / "last.pt"), "kept": kept,
        "seconds": round(seconds, 1),
        "median_s_per_step": round(statistics.median(walls), 3),
        "peak_memory_gib": round(records[-1].get("peak_memory_bytes", 0) / 2**30, 2),
        "loss_first_mean": round(statistics.fmean(curve["loss"][:window]), 4),
        "loss_last_mean": round(statistics.fmean(curve["loss"][-window:]), 4),
        "loss_window": window, "curve": curve,
    }


def pretrain_or_reuse(config, data: Path, work: Path, reuse: bool) -> dict:
    """Pretrain in ``work/pretrain_run`` keeping the student at every save in
    ``work/kept``. With ``reuse``, a run of this very config there is taken as it is
    when finished, and continued from its last checkpoint when interrupted; a run of
    another config there is an error (one pretraining config per work folder)."""
    from voco_core.checkpoint import load_pretrain_checkpoint
    from voco_core.config import pretrain_config_from_dict
    from voco_core.train.pretrain import pretrain

    run_dir, keep_dir = work / "pretrain_run", work / "kept"
    last = run_dir / "checkpoints" / "last.pt"
    total = config.optim.total_steps
    resume = None
    if last.is_file():
        state = load_pretrain_checkpoint(last)
        # The saved config read back through today's schema: fields added since
        # that run get their defaults instead of making an identical run "other".
        saved = pretrain_config_from_dict(state["config"], check_device=False).to_dict()
        mine = {k: v for k, v in config.to_dict().items() if k != "run"}
        theirs = {k: v for k, v in saved.items() if k != "run"}
        if not mine["data"]["in_channels"]:  # 0: from the data, which the run recorded
            theirs["data"]["in_channels"] = mine["data"]["in_channels"]
        if mine != theirs or state["step"] > total:  # never delete another evaluation's run
            raise SystemExit(f"quality_bench: error: {run_dir} holds a pretraining run of "
                             "another config; give this evaluation its own --work")
        if reuse and state["step"] == total and (run_dir / "log.jsonl").is_file():
            log(f"--reuse: the finished pretraining run in {run_dir}")
            seconds = sum(r.get("seconds_per_step", 0.0) for r in _log(run_dir))
            return {**pretraining_record(run_dir, seconds, _kept(keep_dir)),
                    "reused": str(run_dir)}
        if reuse:
            log(f"--reuse: continuing the pretraining run in {run_dir} at step "
                f"{state['step']}")
            resume = last
    if resume is None:
        shutil.rmtree(run_dir, ignore_errors=True)
        shutil.rmtree(keep_dir, ignore_errors=True)
    keep_dir.mkdir(parents=True, exist_ok=True)
    kept = _kept(keep_dir)

    def callback(event):
        if event.kind != "step":
            return
        if event.checkpoint:
            target = keep_dir / f"step_{event.step:05d}.pt"
            shutil.copyfile(event.checkpoint, target)
            kept[event.step] = str(target)
        if event.step % max(1, total // 10) == 0 or event.step == 1:
            log(f"  pretrain step {event.step}/{total}: loss {event.loss:.4f} "
                f"({event.seconds_per_step:.2f} s/step)")

    start = time.perf_counter()
    pretrain(config, data, run_dir, resume=resume, callback=callback)
    seconds = time.perf_counter() - start
    if resume is not None:  # the steps before the interruption, as logged
        seconds = sum(r.get("seconds_per_step", 0.0) for r in _log(run_dir))
    return pretraining_record(run_dir, seconds, kept)


def pretrained_checkpoint(pretraining: dict, step: int | None) -> str:
    """The checkpoint the VoCo runs start from: the run's last one, or (``step``, the
    ``--pretrained-step`` lever) the student kept at that pretraining step."""
    if step is None:
        return pretraining["checkpoint"]
    kept = {int(k): v for k, v in pretraining["kept"].items()}
    if step not in kept:
        raise SystemExit(f"quality_bench: error: --pretrained-step {step}: no student kept "
                         f"at that step (kept: {', '.join(map(str, sorted(kept))) or 'none'})")
    return kept[step]


def _kept(keep_dir: Path) -> dict[int, str]:
    return {int(p.stem.split("_")[1]): str(p) for p in sorted(keep_dir.glob("step_*.pt"))}


def _log(run_dir: Path) -> list[dict]:
    from voco_core.train.pretrain import read_log

    return read_log(run_dir / "log.jsonl")


# ---------------------------------------------------------------- finetuning


def run_key(mode: str, shots: int, seed: int, init: str) -> str:
    return f"{mode}/{shots}shot/seed{seed}/{init}"


def choose_subjects(pool_size: int, shots: int, seed: int) -> list[int]:
    """The labelled phantoms of seed ``seed`` (the same for both inits)."""
    import numpy as np

    return sorted(np.random.default_rng([seed, shots]).choice(
        pool_size, size=shots, replace=False).tolist())


def finetune_run(config, entries, validation, pretrained, run_dir: Path, initial=None,
                 keep_run: bool = False) -> dict:
    """One finetuning run; its learning curve is the held-out validation Dice at every
    ``train.val_every`` steps (and the last), on the pre-processed grid. ``initial``: a
    finetuned checkpoint to continue from (a correct-and-retrain round); ``keep_run``
    keeps the run folder (its checkpoints) instead of deleting it at the end."""
    from voco_core.train.finetune import iter_finetune

    start = time.perf_counter()
    curve: list[dict] = []
    step_seconds: list[float] = []
    load_message, final_loss = "", None
    shutil.rmtree(run_dir, ignore_errors=True)
    for event in iter_finetune(config, entries, run_dir, pretrained=pretrained,
                               validation=validation, initial=initial):
        if event.kind == "start":
            load_message = event.message or ""
        elif event.kind == "step":
            step_seconds.append(event.seconds_per_step)
            final_loss = event.loss
        elif event.kind == "validation":
            curve.append({"step": event.step, "mean_dice": _round(event.mean_dice),
                          "class_dice": {k: _round(v) for k, v in event.class_dice.items()}})
    # A new step event repeats the validation event's fields; keep the first per step.
    by_step = {}
    for point in curve:
        by_step.setdefault(point["step"], point)
    if not keep_run:
        shutil.rmtree(run_dir, ignore_errors=True)
    return {
        "curve": [by_step[s] for s in sorted(by_step)],
        "final_loss": _round(final_loss),
        "median_s_per_step": round(statistics.median(step_seconds[1:] or step_seconds), 3),
        "seconds": round(time.perf_counter() - start, 1),
        "backbone_load": load_message.splitlines()[0] if load_message else None,
    }


def _round(value) -> float | None:
    if value is None:
        return None
    value = float(value)
    return round(value, 4) if math.isfinite(value) else None


# ---------------------------------------------------------------- results file


class ResultStore:
    """The results JSON, rewritten after every finished run.

    ``fingerprint`` (configs and populations) guards ``--resume-results``: runs are
    only reused from a file written with the same settings."""

    def __init__(self, path: Path, report: dict, resume: bool, prog: str = "quality_bench",
                 overwrite: bool = False):
        self.path, self.report = path, report
        self.report.setdefault("runs", {})
        if not resume and path.is_file() and not overwrite:  # a recorded result, perhaps
            raise SystemExit(f"{prog}: error: {path} exists; go on with it "
                             "(--resume-results), choose another --out, or pass --overwrite "
                             "to replace it")
        if resume:
            if not path.is_file():
                raise SystemExit(f"{prog}: error: --resume-results {path}: no such file")
            try:
                old = json.loads(path.read_text())
            except (OSError, ValueError) as err:
                raise SystemExit(f"{prog}: error: --resume-results {path}: not a "
                                 f"results file ({err})") from err
            differ = differing_keys(old.get("fingerprint", {}), report["fingerprint"])
            added = [key for key in differ
                     if added_at_default(old.get("fingerprint", {}), report["fingerprint"], key)]
            if set(differ) - set(added):
                raise SystemExit(f"{prog}: error: --resume-results {path} was written "
                                 f"with other settings (differ: "
                                 f"{', '.join(k for k in differ if k not in added)})")
            if added:
                log(f"--resume-results: config fields added since {path.name} was written, "
                    f"at their defaults (the behaviour before them): {', '.join(added)}")
                self.report["fingerprint"] = old["fingerprint"]  # the file's, as written
            self.report["runs"] = old.get("runs", {})
            log(f"--resume-results: {len(self.report['runs'])} finished runs in {path}")

    def done(self, key: str) -> bool:
        return key in self.report["runs"]

    def add(self, key: str, row: dict) -> None:
        from .report import summarise

        self.report["runs"][key] = row
        self.report["summary"] = summarise(self.report)
        self.save()

    def save(self) -> None:
        write_json_atomic(self.path, self.report)

    def finish(self, summary: dict) -> None:
        """Mark the run finished, with the final summary and the load at the end."""
        self.report["status"] = "finished"
        self.report["machine"]["loadavg_at_end"] = [round(x, 2) for x in os.getloadavg()]
        self.report["summary"] = summary
        self.save()


ENCODER_LEVERS = ("encoder_lr_scale", "freeze_encoder_steps")
"""Finetuning keys that only change how a pretrained encoder is treated."""

SCHEMA_ADDITIONS = {"data.in_channels": 0, "train.ce_balance": 0.0,
                    "train.batch_dice": False}
"""Finetuning config keys added since older results files were written, with the value
that means what those files did (``in_channels: 0``: one channel, from the data;
``ce_balance: 0`` and ``batch_dice: false``: plain DiceCE)."""


def control_fingerprint(fingerprint: dict) -> dict:
    """What a control run (scratch, random init) depends on: the populations and the
    finetuning configs, without the encoder levers (they only treat a pretrained
    encoder) and without the keys of :data:`SCHEMA_ADDITIONS` at their old meaning.
    Not the pretraining, nor its unlabelled population: a control run never loads the
    pretrained checkpoint."""
    finetune = json.loads(json.dumps(fingerprint.get("finetune", {})))
    for mode in finetune.values():
        for key in ENCODER_LEVERS:
            mode.get("train", {}).pop(key, None)
        for dotted_key, old_value in SCHEMA_ADDITIONS.items():
            section, key = dotted_key.split(".")
            if mode.get(section, {}).get(key, old_value) == old_value:
                mode.get(section, {}).pop(key, None)
    populations = json.loads(json.dumps(fingerprint.get("populations") or {}))
    populations.pop("n_pretrain", None)
    populations.get("seeds", {}).pop("pretrain", None)
    return {"populations": populations, "finetune": finetune}


def merge_results(paths: list[Path], prog: str = "quality_bench") -> dict:
    """One report from results files of the same evaluation (same fingerprint), e.g.
    seeds or sections split over processes: the first file, plus every run of the
    others it lacks (a run key in two files keeps the first file's). ``merged_from``
    lists each added file, its command and the keys it brought; the status is
    ``finished`` only when every file's is. The summary is left to the caller."""
    reports = []
    for path in paths:
        try:
            reports.append(json.loads(Path(path).read_text()))
        except (OSError, ValueError) as err:
            raise SystemExit(f"{prog}: error: --merge {path}: not a results file "
                             f"({err})") from err
    merged = json.loads(json.dumps(reports[0]))
    merged.setdefault("merged_from", [])
    merged.setdefault("timings_s", {})
    for path, other in zip(paths[1:], reports[1:], strict=True):
        if other.get("fingerprint") != merged.get("fingerprint"):
            differ = differing_keys(merged.get("fingerprint", {}), other.get("fingerprint", {}))
            raise SystemExit(f"{prog}: error: --merge {path} was written with other settings "
                             f"than {paths[0]} (differ: {', '.join(differ)})")
        added = [key for key in other.get("runs", {}) if key not in merged["runs"]]
        merged["runs"].update({key: other["runs"][key] for key in added})
        merged["merged_from"].append({"file": Path(path).name, "command": other.get("command"),
                                      "started_at": other.get("started_at"), "runs": added})
        for key, value in other.get("timings_s", {}).items():
            merged["timings_s"][f"{Path(path).stem}:{key}"] = value
    merged["status"] = ("finished" if all(r.get("status") == "finished" for r in reports)
                        else "partial")
    return merged


def added_at_default(old: dict, new: dict, key: str) -> bool:
    """Whether the dotted config ``key`` of a fingerprint is absent from ``old`` (a field
    added to the library since the file was written) and ``new`` holds its dataclass
    default, the value that keeps the behaviour from before the field existed (as
    reading an older checkpoint's config fills such fields)."""
    import dataclasses

    from voco_core.config import FinetuneConfig, PretrainConfig

    parts = key.split(".")
    node, value = old, new
    for part in parts:
        if not isinstance(value, dict) or part not in value:
            return False
        value = value[part]
        if isinstance(node, dict):
            node = node.get(part, _ABSENT)
    if node is not _ABSENT:
        return False  # in the file with another value: a real difference
    roots = {"finetune": FinetuneConfig, "pretrain": PretrainConfig}
    if parts[0] not in roots:
        return False
    kind: type | None = roots[parts[0]]
    default = _ABSENT
    for part in parts[1:]:
        fields = {f.name: f for f in dataclasses.fields(kind)} if kind else {}
        if part not in fields:
            if kind is roots[parts[0]]:
                continue  # a name above the config (the quality benchmark's mode)
            return False
        field = fields[part]
        if field.default is not dataclasses.MISSING:
            default = field.default
        elif field.default_factory is not dataclasses.MISSING:
            default = field.default_factory()
        kind = type(default) if dataclasses.is_dataclass(default) else None
    if dataclasses.is_dataclass(default):
        return False
    return default is not _ABSENT and value == default


_ABSENT = object()


def differing_keys(a, b, prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two nested dicts (``finetune.full.data.spacing``)."""
    if not (isinstance(a, dict) and isinstance(b, dict)):
        return [] if a == b else [prefix or "(value)"]
    return [key for name in sorted(set(a) | set(b))
            for key in differing_keys(a.get(name), b.get(name),
                                      f"{prefix}.{name}" if prefix else name)]


def copy_controls(store: ResultStore, path: Path, controls: dict[str, str],
                  wanted: set[str], prog: str = "quality_bench") -> int:
    """Copy the control runs (``controls``: mode -> init, e.g. full -> scratch) named in
    ``wanted`` from the results file ``path`` into ``store``; returns how many.

    For a lever of the pretrained init only (pretraining recipe, encoder lr, decoder
    warm-up): the controls of ``path`` are what this invocation would run, so ``path``
    must match this one's :func:`control_fingerprint` (populations and finetuning).
    Copied rows say where they came from (``copied_from``)."""
    try:
        old = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise SystemExit(f"{prog}: error: --control-from {path}: not a results file "
                         f"({err})") from err
    mine = control_fingerprint(store.report["fingerprint"])
    theirs = control_fingerprint(old.get("fingerprint", {}))
    if mine != theirs:
        raise SystemExit(f"{prog}: error: --control-from {path} was written with other "
                         f"populations or finetuning settings (differ: "
                         f"{', '.join(differing_keys(mine, theirs))})")
    copied = 0
    for key, row in old.get("runs", {}).items():
        mode, _, _, init = key.split("/")
        if key in wanted and controls.get(mode) == init and not store.done(key):
            store.report["runs"][key] = {**row, "copied_from": str(path)}
            copied += 1
    store.save()
    return copied
