"""Sparse labels: how much annotation effort does VoCo pretraining save?

Held-out Dice against annotation effort on phantoms: each labelled training volume
is annotated on ``k`` whole axial slices only (``--slices``, default 1, 3, 10; the
other slices carry the ignore label 255, ``data.ignore_label``), or on every slice
(``whole``). Each setting is finetuned from scratch and from the VoCo backbone with
the same step budget, over paired seeds: seed ``s`` picks the labelled phantoms
(:func:`quality.runs.choose_subjects`, as the quality benchmark does), which slices
are annotated, and seeds the finetuning run; both inits get the same ``s``.

Slices: ``k`` evenly spaced axial slices through the labelled foreground with one
random offset per phantom and seed (systematic sampling: slice ``i`` lies in the
``i``-th of ``k`` equal stretches of the foreground, at the same relative place in
each), turned into a sparse map by :func:`voco_core.data.sparse.slices_to_sparse`,
the rule the GUI applies to painted slices.

Reuses the quality benchmark's parts: its phantom populations and seeds, its
pretraining config (``--backbone CKPT`` takes a finished VoCo checkpoint instead),
its finetuning runs, incremental results file and paired statistics.

Two protocols (``--protocol``):

- ``plateau`` (default): the finetuning preset's own recipe (``tiny``: 4 mm grid,
  class-balanced CE, batch Dice, lr 2e-3) for ``--steps``, validated on the dense
  held-out phantoms every ``--val-every`` steps; a run's Dice is its plateau Dice (the
  mean of its last 3 validations, ``voco compare``'s reading), and whether each
  setting's curves have flattened (overall and per class) is reported beside it.
- ``recorded``: the protocol of the recorded results (the old recipe, 50 steps, one
  validation at the last step), which ``--resume-results`` of an older file keeps.

Usage:
    python benchmarks/sparse_bench.py --quick                  # smoke test, < 3 minutes
    python benchmarks/sparse_bench.py --work W --jobs 2        # CPU default, see the docs
    python benchmarks/sparse_bench.py --work W --protocol recorded   # the recorded 50 steps
    python benchmarks/sparse_bench.py --work W --backbone /path/to/pretrain/last.pt
    python benchmarks/sparse_bench.py --resume-results R.json   # a stopped run, same settings
    python benchmarks/sparse_bench.py --summarize benchmarks/results/sparse_bench_cpu.json
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

from quality.jobs import Jobs, add_job_arguments, add_overwrite_argument, settle_jobs
from quality.runs import (
    ResultStore,
    choose_subjects,
    finetune_run,
    heldout_entries,
    import_package,
    log,
    make_populations,
    pretrain_or_reuse,
    report_header,
    run_key,
)
from quality.settings import (
    POPULATION_SEEDS,
    dotted,
    fill_defaults,
    finetune_config,
    phantom_data,
    pretrain_config,
)
from sparse.report import (
    EFFORT_WHOLE,
    markdown,
    plot_dice_vs_slices,
    run_dice,
    summarise,
    summary_line,
)

ROOT = Path(__file__).resolve().parent.parent
IGNORE_LABEL = 255  # nnU-Net's convention: above every class
INITS = ("scratch", "voco")

PROTOCOLS = ("plateau", "recorded")
SETTINGS = {
    "recorded": {  # CPU, one thread: about 55 minutes of finetuning (arithmetic in the
        # docs); one 64^3 crop per step, as the quality benchmark (two crops doubled it)
        "phantom_shape": (96, 96, 64), "n_pretrain": 16, "n_heldout": 4, "n_pool": 6,
        "pretrain_steps": 250, "eval_every": 50, "seeds": 3, "shots": 2,
        "slices": "1,3,10", "steps": 50, "val_every": 50, "finetune_samples": 1,
    },
    "plateau": {  # the preset's recipe until the curves flatten: 300 steps (2 labelled
        # classic phantoms: flat from step 250, finetune_recipe_tiny_cpu.json); about 27
        # min per run at one thread beside another, so 12 runs ~2.7 h with --jobs 2
        "phantom_shape": (96, 96, 64), "n_pretrain": 16, "n_heldout": 4, "n_pool": 6,
        "pretrain_steps": 250, "eval_every": 50, "seeds": 2, "shots": 2,
        "slices": "3,10", "steps": 300, "val_every": 30, "finetune_samples": None,
    },
}
QUICK = {  # every path once: 2 paired seeds, 1 slice and whole, small phantoms, 2 steps
    "phantom_shape": (64, 64, 48), "n_pretrain": 3, "n_heldout": 1, "n_pool": 3,
    "pretrain_steps": 3, "eval_every": 3, "seeds": 2, "shots": 2, "slices": "1",
    "steps": 2, "val_every": 1, "finetune_samples": 1,
}


class SparseStore(ResultStore):
    """The quality benchmark's results file, summarised the sparse way after each run."""

    def add(self, key: str, row: dict) -> None:
        self.report["runs"][key] = row
        self.report["summary"] = summarise(self.report)
        self.save()


# ---------------------------------------------------------------- arguments


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="sparse_bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N (preset tiny)")
    parser.add_argument("--quick", action="store_true",
                        help="smoke test (small sizes; outputs go to the work folder)")
    parser.add_argument("--out", type=Path, help="results JSON (default: benchmarks/results/"
                        "sparse_bench_<device>.json)")
    parser.add_argument("--figure", type=Path, default=None,
                        help="figure path (default docs/figures/<results stem>.png; --quick: "
                             "the work folder)")
    parser.add_argument("--work", type=Path, help="folder for phantoms, sparse label maps "
                        "and the pretraining run (default: a new temp folder)")
    parser.add_argument("--backbone", type=Path, metavar="CKPT",
                        help="a finished VoCo pretraining checkpoint to finetune from (copied "
                             "into --work) instead of pretraining here")
    parser.add_argument("--resume-results", type=Path, metavar="FILE",
                        help="continue FILE: skip its finished runs (same settings only)")
    parser.add_argument("--summarize", type=Path, metavar="FILE",
                        help="only print the tables of FILE and write its figure")
    parser.add_argument("--seed", type=int, default=0, help="pretraining run seed")
    add_overwrite_argument(parser)
    add_job_arguments(parser, "the finetuning runs, each in its own process")
    parser.add_argument("--protocol", choices=PROTOCOLS, default=None,
                        help="plateau (default): the preset's recipe read at the plateau; "
                             "recorded: the recorded results' 50-step protocol (with "
                             "--resume-results: the file's)")
    d = argparse.SUPPRESS  # filled from SETTINGS (and QUICK)
    sizes = parser.add_argument_group("sizes (defaults: SETTINGS, --quick: QUICK)")
    sizes.add_argument("--phantom-shape", type=int, nargs=3, default=d)
    sizes.add_argument("--n-pretrain", type=int, default=d, help="unlabelled phantoms")
    sizes.add_argument("--n-heldout", type=int, default=d, help="held-out phantoms (dense)")
    sizes.add_argument("--n-pool", type=int, default=d, help="labelled pool")
    sizes.add_argument("--pretrain-steps", type=int, default=d)
    sizes.add_argument("--eval-every", type=int, default=d,
                       help="pretraining checkpoint every N steps")
    sizes.add_argument("--seeds", type=int, default=d, help="paired seeds per setting")
    sizes.add_argument("--first-seed", type=int, default=0)
    sizes.add_argument("--shots", type=int, default=d, help="labelled phantoms per run")
    sizes.add_argument("--slices", default=d,
                       help="comma list of annotated axial slices per phantom (whole volumes "
                            "always run too)")
    sizes.add_argument("--steps", type=int, default=d, help="finetuning steps of every run")
    sizes.add_argument("--val-every", type=int, default=d,
                       help="steps between held-out validations (plateau protocol)")
    sizes.add_argument("--finetune-samples", type=int, default=d,
                       help="crops per step (train.samples_per_volume; default the preset's)")
    sizes.add_argument("--finetune-set", action="append", metavar="SECTION.KEY=VALUE",
                       help="any finetuning config override (repeatable)")
    args = parser.parse_args(argv)
    if args.summarize:
        return args
    if args.protocol is None:  # a resumed file goes on with its own protocol
        recorded = {}
        if args.resume_results and args.resume_results.is_file():
            try:
                recorded = json.loads(args.resume_results.read_text()).get("settings", {})
            except ValueError:
                parser.error(f"--resume-results {args.resume_results}: not a results file")
        args.protocol = recorded.get("protocol", "recorded") if recorded else "plateau"
    for key, value in {**SETTINGS[args.protocol], **(QUICK if args.quick else {})}.items():
        if not hasattr(args, key):  # not given on the command line
            setattr(args, key, value)
    args.phantom_shape = tuple(args.phantom_shape)
    try:
        args.slices = sorted({int(s) for s in str(args.slices).split(",") if s.strip()})
    except ValueError:
        parser.error(f"--slices {args.slices!r}: expected a comma list of integers, e.g. 1,3,10")
    if not args.slices or args.slices[0] < 1 or args.slices[-1] >= args.phantom_shape[2]:
        parser.error(f"--slices {args.slices}: each must be in 1..{args.phantom_shape[2] - 1} "
                     f"(fewer than the {args.phantom_shape[2]} axial slices of a phantom)")
    if args.protocol == "recorded":
        args.val_every = args.steps  # one validation, at the last step
    settle_jobs(parser, args)
    for name in ("seeds", "steps", "val_every", "pretrain_steps", "eval_every", "n_pretrain",
                 "n_pool", "n_heldout", "shots"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} {getattr(args, name)}: expected >= 1")
    if args.shots > args.n_pool:
        parser.error(f"--shots {args.shots}: expected at most --n-pool ({args.n_pool})")
    try:
        dotted(args.finetune_set, "--finetune-set")
    except argparse.ArgumentTypeError as err:
        parser.error(str(err))
    if args.backbone is not None and not args.backbone.is_file():
        parser.error(f"--backbone {args.backbone}: no such file (expected a VoCo pretraining "
                     "checkpoint, e.g. RUN/checkpoints/last.pt)")
    if args.resume_results:
        if args.out and args.out.resolve() != args.resume_results.resolve():
            parser.error("--out and --resume-results name different files; give one")
        args.out = args.resume_results
    return args


def run_config(args, q, seed: int):
    """The finetuning config of one run of ``args.protocol`` (``q``: :func:`quality_args`)."""
    if args.protocol == "recorded":
        return finetune_config(q, "full", seed)
    from voco_core.config import make_finetune_config, merge

    train = {"total_steps": args.steps, "val_every": args.val_every}
    if args.finetune_samples:
        train["samples_per_volume"] = args.finetune_samples
    base = {  # the preset's recipe; what the phantoms are, stated
        "data": {**phantom_data(), "ignore_label": IGNORE_LABEL},
        "train": train,
        "run": {"device": args.device, "seed": seed, "tensorboard": False,
                "checkpoint_every": args.steps, "log_every": 10},
    }
    return make_finetune_config("tiny", merge(base, dotted(args.finetune_set,
                                                            "--finetune-set")))


def quality_args(args) -> argparse.Namespace:
    """The quality benchmark's arguments for these sizes: its pretraining config and its
    ``full`` finetuning config (preset tiny, flips/rot90 off in pretraining), with the
    ignore label declared, one validation at the last step, and ``--finetune-set``."""
    q = argparse.Namespace(preset="tiny", quick=args.quick)
    fill_defaults(q)
    q.__dict__.update(
        device=args.device, seed=args.seed, phantom_shape=args.phantom_shape,
        n_pretrain=args.n_pretrain, n_heldout=args.n_heldout, n_pool=args.n_pool,
        eval_every=args.eval_every, full_steps=args.steps, full_curve_every=args.steps,
        finetune_samples=args.finetune_samples, pretrain_lr=None, loss_variant=None,
        align_scales=False, align_spacing=None, encoder_lr_scale=None,
        freeze_encoder_steps=None, pretrain_set=None,
        finetune_set=[f"data.ignore_label={IGNORE_LABEL}", *(args.finetune_set or [])])
    return q


# ---------------------------------------------------------------- sparse label maps


def axial_axis(affine) -> int:
    """The array axis running inferior-superior (the axial slices' normal)."""
    import nibabel as nib

    return "".join(nib.aff2axcodes(affine)).replace("I", "S").index("S")


def chosen_slices(foreground: list[int], k: int, offset: float) -> list[int]:
    """``k`` evenly spaced slices of the ``foreground`` slice indices: slice ``i`` at
    ``(i + offset) / k`` of the way through, ``offset`` in [0, 1) (systematic sampling;
    distinct while ``k <= len(foreground)``)."""
    n = len(foreground)
    return [foreground[min(n - 1, int((i + offset) * n / k))] for i in range(k)]


def sparse_entries(pool, chosen: list[int], k: int | None, seed: int, folder: Path):
    """Training entries of one setting: the chosen pool phantoms with ``k`` annotated
    axial slices each (``None``: the dense maps as they are), and what was annotated."""
    import nibabel as nib
    import numpy as np

    from voco_core.data.datalists import DatalistEntry
    from voco_core.data.sparse import annotated_slices, slices_to_sparse

    entries, annotation = [], []
    for index in chosen:
        entry = pool[index]
        if k is None:
            entries.append(entry)
            annotation.append({"subject": f"pool/phantom_{index:03d}", "slices": "all"})
            continue
        image = nib.load(entry.label)
        dense = np.asarray(image.dataobj)
        axis = axial_axis(image.affine)
        foreground = np.flatnonzero(annotated_slices(dense, axis)).tolist()
        offset = float(np.random.default_rng([seed, index]).random())  # same for every k
        keep = chosen_slices(foreground, k, offset)
        painted = np.zeros_like(dense)
        where = [slice(None)] * dense.ndim
        where[axis] = keep
        painted[tuple(where)] = dense[tuple(where)]
        sparse = slices_to_sparse(painted, axis=axis, ignore_label=IGNORE_LABEL)
        path = folder / f"seed{seed}" / f"k{k}" / entry.label.name
        path.parent.mkdir(parents=True, exist_ok=True)
        nib.save(nib.Nifti1Image(sparse.astype(np.uint8), image.affine, image.header), path)
        entries.append(DatalistEntry(entry.image, path))
        annotation.append({"subject": f"pool/phantom_{index:03d}", "axis": axis,
                           "slices": keep, "annotated_fraction": round(
                               float(np.mean(sparse != IGNORE_LABEL)), 4)})
    return entries, annotation


# ---------------------------------------------------------------- backbone


def backbone(args, config, folders, work: Path) -> dict:
    """The VoCo checkpoint: ``--backbone`` copied into ``work``, else pretrained here
    (or reused from an earlier invocation with the same config)."""
    if args.backbone is None:
        log(f"pretraining: {args.pretrain_steps} steps (the quality benchmark's tiny config)")
        record = pretrain_or_reuse(config, folders["pretrain"], work, reuse=True)
        return {"source": "pretrained here", "checkpoint": record["checkpoint"],
                "steps": args.pretrain_steps, "seconds": record["seconds"],
                "loss_first_mean": record["loss_first_mean"],
                "loss_last_mean": record["loss_last_mean"]}
    from voco_core.checkpoint import file_digest, load_pretrain_checkpoint
    from voco_core.config import pretrain_config_from_dict

    target = work / "backbone.pt"
    if not (target.is_file() and target.samefile(args.backbone)):
        shutil.copyfile(args.backbone, target)  # a copy: the source may be overwritten later
    state = load_pretrain_checkpoint(target)
    digest = file_digest(target)
    # Read back through today's schema (as quality.runs.pretrain_or_reuse does): fields
    # added since the checkpoint was written take their defaults.
    saved = pretrain_config_from_dict(state["config"], check_device=False).to_dict()
    differ = config_differences(config.to_dict(), saved)
    log(f"backbone: {args.backbone} (step {state['step']}, sha256 {digest}); config vs "
        f"this benchmark's pretraining: {', '.join(differ) or 'the same'}")
    return {"source": str(args.backbone), "checkpoint": str(target), "steps": state["step"],
            "sha256_16": digest, "config_differences": differ, "config": state["config"]}


def config_differences(mine: dict, theirs: dict, prefix: str = "") -> list[str]:
    """Dotted keys (``run`` aside) whose values differ; a key the checkpoint lacks (a
    field added to the library since) is listed as ``key (absent, default here: v)``."""
    out = []
    for key in sorted(mine):
        name = f"{prefix}{key}"
        if name == "run":
            continue
        if key not in theirs:
            out.append(f"{name} (absent, default here: {mine[key]!r})")
        elif isinstance(mine[key], dict) and isinstance(theirs[key], dict):
            out += config_differences(mine[key], theirs[key], f"{name}.")
        elif mine[key] != theirs[key]:
            out.append(f"{name} ({theirs[key]!r}, here {mine[key]!r})")
    return out


# ---------------------------------------------------------------- main


def fingerprint(args, q) -> dict:
    """What must match for ``--resume-results`` to reuse finished runs (checked before
    anything in the work folder is changed)."""
    from voco_core.checkpoint import file_digest

    finetune = {k: v for k, v in run_config(args, q, 0).to_dict().items() if k != "run"}
    # The recorded protocol's fingerprint is the one its file was written with.
    protocol = {} if args.protocol == "recorded" else {"protocol": args.protocol}
    return json.loads(json.dumps({
        **protocol, "finetune": finetune,
        "backbone": file_digest(args.backbone) if args.backbone else {
            "pretrain_steps": args.pretrain_steps, "seed": args.seed},
        "shots": args.shots, "ignore_label": IGNORE_LABEL,
        "populations": {"seeds": {k: v for k, v in POPULATION_SEEDS.items()
                                  if k != "plateau"},  # not a population of this benchmark
                        "shape": list(args.phantom_shape),
                        "n_pretrain": args.n_pretrain, "n_heldout": args.n_heldout,
                        "n_pool": args.n_pool}}))


def summarize_file(args) -> None:
    try:
        report = json.loads(args.summarize.read_text())
    except (OSError, ValueError) as err:
        raise SystemExit(f"sparse_bench: error: --summarize {args.summarize}: cannot read a "
                         f"results file ({err})") from err
    report["summary"] = summarise(report)
    print(markdown(report))
    figure = args.figure or ROOT / "docs" / "figures" / f"{args.summarize.stem}.png"
    if plot_dice_vs_slices(report, figure):
        print(f"figure: {figure}")
    print(summary_line(report))


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.summarize:
        summarize_file(args)
        return
    started = time.perf_counter()

    import_package("voco_core.data.sparse", "voco_core.models", threads=(
        args.threads if args.jobs == 1 else 1))
    from voco_core.data.datalists import load_datalist
    from voco_core.errors import VoCoError

    if args.resume_results and args.resume_results.is_file():
        recorded = json.loads(args.resume_results.read_text())
        if args.work is None and recorded.get("work"):
            args.work = Path(recorded["work"])
        copied = args.work / "backbone.pt" if args.work else None
        if args.backbone is None and recorded.get("settings", {}).get("backbone") and (
                copied and copied.is_file()):
            args.backbone = copied  # the run's own copy of its --backbone
    temporary = args.work is None
    work = args.work or Path(tempfile.mkdtemp(prefix="voco-sparse-"))
    work.mkdir(parents=True, exist_ok=True)
    device_name = "cuda" if args.device.startswith("cuda") else args.device
    out = args.out or (work / "sparse_bench_quick.json" if args.quick else
                       ROOT / "benchmarks" / "results" / f"sparse_bench_"
                       f"{'' if args.protocol == 'recorded' else 'plateau_'}{device_name}.json")
    figure = args.figure or (work if args.quick else ROOT / "docs" / "figures") / (
        f"{out.stem}.png")

    try:
        q = quality_args(args)
        config = pretrain_config(q, args.pretrain_steps)
        report = {
            **report_header("sparse_bench (held-out Dice against annotated slices per "
                            "volume)", args, work, temporary),
            "fingerprint": fingerprint(args, q),
            "finetune_config": run_config(args, q, 0).to_dict(),
            "dice": "held-out mean Dice over the 10 foreground classes on the finetuning "
                    "pre-processed grid (the run's own sliding-window validation on the "
                    "dense held-out phantoms), " + (
                        "at the last step" if args.protocol == "recorded" else
                        "at the plateau: the mean of the last 3 validations "
                        f"(every {args.val_every} steps)"),
            "efforts": [*args.slices, EFFORT_WHOLE],
            "axial_slices": args.phantom_shape[2],
        }
        store = SparseStore(out, report, resume=args.resume_results is not None,
                            overwrite=args.overwrite,
                            prog="sparse_bench")
        folders = make_populations(q, work)
        record = backbone(args, config, folders, work)
        report["backbone"] = {k: v for k, v in record.items() if k != "config"}
        store.save()
        log(f"sparse_bench: work {work}, results {out}")

        heldout = heldout_entries(folders["heldout"], args.n_heldout)
        pool = load_datalist(folders["pool"], require_labels=True)
        # Seeds outermost, so a partial results file holds whole paired curves, and the
        # whole volumes first in each: every fraction needs its whole-volume reference.
        planned = []
        for seed in range(args.first_seed, args.first_seed + args.seeds):
            chosen = choose_subjects(len(pool), args.shots, seed)
            for k in [None, *args.slices]:
                effort = EFFORT_WHOLE if k is None else f"k{k}"
                entries, annotation = sparse_entries(pool, chosen, k, seed, work / "sparse")
                for init in INITS:
                    key = run_key(effort, args.shots, seed, init)
                    if not store.done(key):
                        planned.append((key, run_config(args, q, seed), entries, annotation,
                                        record["checkpoint"] if init == "voco" else None))
        with Jobs(args.jobs, args.threads) as jobs:
            handles = {jobs.submit(finetune_run, config, entries, heldout, checkpoint,
                                   work / "finetune_runs" / key.replace("/", "_")):
                       (key, annotation)
                       for key, config, entries, annotation, checkpoint in planned}
            for handle in jobs.finished(list(handles)):
                key, annotation = handles[handle]
                row = handle.result()
                row["annotation"] = annotation
                row["loadavg_1min"] = round(os.getloadavg()[0], 2)
                store.add(key, row)
                log(f"  {key}: Dice {run_dice(report, row)} ({row['seconds']} s, "
                    f"{row['median_s_per_step']} s/step)")
    except VoCoError as err:
        raise SystemExit(f"sparse_bench: error: {err}") from err

    report["total_s"] = round(time.perf_counter() - started, 1)
    store.finish(summarise(report))
    made = plot_dice_vs_slices(report, figure)
    if temporary and not args.quick:
        shutil.rmtree(work, ignore_errors=True)
    print(markdown(report))
    if made:
        print(f"figure: {figure}")
    print(summary_line(report))
    print(f"sparse_bench ({args.device}, {report['total_s'] / 60:.1f} min) -> {out}")


if __name__ == "__main__":
    main()
