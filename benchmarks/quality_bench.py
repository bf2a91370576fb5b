"""Quality: does VoCo pretraining make few-label segmentation better?

One invocation pretrains once and reuses that run for every comparison:

1. Phantoms (in ``--work``): an unlabelled pretraining population, held-out subjects
   and a labelled pool, from three population seeds, so no subject is shared.
2. Pretraining (``tiny`` on CPU, ``base`` with ``--preset base --device cuda``); the
   student is kept every ``--eval-every`` steps.
3. Positions (section ``positions``): held-out position prediction of every kept
   student beside random inits, raw-intensity cosine, a constant prior and chance.
4. Frozen-encoder probe (section ``probe``): encoder frozen
   (``train.encoder_lr_scale: 0``), only the SwinUNETR decoder trains, on top of the
   VoCo encoder vs a randomly initialised one.
5. Full finetuning at the plateau (section ``plateau``): ``voco compare`` of the
   VoCo backbone against scratch on a labelled population of the varied phantom style,
   K folds x paired seeds, the finetuning preset's recipe, until the held-out curves
   flatten; both readings (final quality, efficiency) per class
   (:mod:`quality.plateau`).
6. The recorded 80-step protocol (section ``full``, not in the default sections):
   SwinUNETR from scratch vs from the VoCo backbone with the old recipe, a learning
   curve every ``--full-curve-every`` steps. It reproduces the recorded results.

Probe and full runs are *paired*: seed ``s`` picks the labelled phantoms and seeds
the run, and both inits get the same ``s`` (so the same decoder initialisation too).
Summaries are paired differences VoCo - control with 95% t and bootstrap intervals,
per curve step, for the normalised area under the curve, and per class. The results
file is rewritten after every finished run; ``--resume-results FILE`` continues it.

Usage:
    python benchmarks/quality_bench.py --work W          # CPU default (tiny), see the docs
    python benchmarks/quality_bench.py --quick           # smoke test, under 3 minutes
    python benchmarks/quality_bench.py --preset base --device cuda --work W   # one H200
    python benchmarks/quality_bench.py --resume-results benchmarks/results/quality_eval_cpu.json
    python benchmarks/quality_bench.py --work W2 --align-scales --out R.json  # one lever
    python benchmarks/quality_bench.py --summarize R.json   # tables + figures from a file
    python benchmarks/quality_bench.py --merge R.json PART.json --out ALL.json  # split runs
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import tempfile
import time
from pathlib import Path

from quality import report as reporting
from quality.jobs import Jobs, add_job_arguments, add_overwrite_argument, finetune_job, settle_jobs
from quality.plateau import plateau_recipe, plateau_scratch_jobs, plateau_section
from quality.positions import position_section
from quality.runs import (
    ResultStore,
    choose_subjects,
    copy_controls,
    heldout_entries,
    import_package,
    log,
    make_populations,
    merge_results,
    pretrain_or_reuse,
    pretrained_checkpoint,
    report_header,
    run_key,
    write_json_atomic,
)
from quality.settings import (
    INITS,
    POPULATION_SEEDS,
    add_arguments,
    dotted,
    fill_defaults,
    finetune_config,
    pretrain_config,
)

ROOT = Path(__file__).resolve().parent.parent
SECTIONS = ("probe", "full", "positions", "plateau")  # in the order they run
DEFAULT_SECTIONS = ("probe", "positions", "plateau")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="quality_bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="tiny", choices=["tiny", "base"],
                        help="pretraining and finetuning preset (default tiny, for CPU)")
    parser.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N")
    parser.add_argument("--quick", action="store_true",
                        help="smoke test (tiny sizes; outputs go to the work folder)")
    parser.add_argument("--out", type=Path, help="results JSON (default: benchmarks/results/"
                        "quality_eval_<device>[_<preset>].json)")
    parser.add_argument("--figures", default=None,
                        help="folder for the figures (default docs/figures; --quick: the "
                             "work folder; '' for none)")
    parser.add_argument("--work", type=Path, help="folder for phantoms and the pretraining "
                        "run, reused by later invocations (default: a new temp folder)")
    parser.add_argument("--reuse", action="store_true",
                        help="reuse a finished pretraining run of the same config in --work")
    parser.add_argument("--resume-results", type=Path, metavar="FILE",
                        help="continue FILE: skip its finished runs, reuse its work folder's "
                             "pretraining run (implies --reuse)")
    parser.add_argument("--summarize", type=Path, metavar="FILE",
                        help="only print the markdown tables of FILE and write its figures")
    parser.add_argument("--against", type=Path, action="append", metavar="FILE",
                        help="with --summarize: also FILE's VoCo runs against this file's, "
                             "paired by seed (a lever against another recipe; repeatable)")
    parser.add_argument("--merge", type=Path, nargs="+", metavar="FILE",
                        help="only merge results files of one evaluation (same settings, e.g. "
                             "seeds split over processes: --first-seed, --seeds) into --out: "
                             "the first file plus the runs the others add, summarised anew")
    parser.add_argument("--seed", type=int, default=0, help="pretraining run seed")
    add_overwrite_argument(parser)
    add_job_arguments(parser, "the control runs and the plateau's scratch arms go beside "
                              "the pretraining")
    parser.add_argument("--sections", default=None,
                        help=f"comma list of {','.join(SECTIONS)} (default "
                             f"{','.join(DEFAULT_SECTIONS)}, with --resume-results the "
                             "file's; full: the recorded 80-step protocol; pretraining "
                             "always runs or is reused)")
    add_arguments(parser)
    args = parser.parse_args(argv)
    if args.merge and not args.out:
        parser.error("--merge: give the merged file's --out")
    if args.summarize or args.merge:
        return args
    fill_defaults(args)
    settle_jobs(parser, args)
    if args.sections is None:  # a resumed file goes on with the sections it was run with
        args.sections = ",".join(_recorded_sections(args.resume_results) or DEFAULT_SECTIONS)
    args.sections = [x.strip() for x in args.sections.split(",") if x.strip()]
    unknown = sorted(set(args.sections) - set(SECTIONS))
    if unknown:
        parser.error(f"--sections: unknown {unknown}; expected some of {list(SECTIONS)}")
    try:
        args.shots = [int(s) for s in str(args.shots).split(",") if s.strip()]
    except ValueError:
        parser.error(f"--shots {args.shots!r}: expected a comma list of integers, e.g. 2,4")
    if args.shots and (min(args.shots) < 1 or max(args.shots) > args.n_pool):
        parser.error(f"--shots {args.shots}: each must be in 1..--n-pool ({args.n_pool})")
    for name in ("seeds", "full_steps", "full_curve_every", "probe_steps", "probe_curve_every",
                 "pretrain_steps", "eval_every", "n_pretrain", "n_pool", "sub_volumes",
                 "plateau_seeds", "plateau_steps", "plateau_every"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} {getattr(args, name)}: expected >= 1")
    if "plateau" in args.sections and not 2 <= args.plateau_folds <= args.plateau_cases:
        parser.error(f"--plateau-folds {args.plateau_folds}: expected 2 to --plateau-cases "
                     f"({args.plateau_cases})")
    if args.n_heldout < 2:
        parser.error("--n-heldout: expected >= 2 (the cross-volume protocol pairs volumes)")
    for option in ("pretrain_set", "finetune_set"):
        try:
            dotted(getattr(args, option), f"--{option.replace('_', '-')}")
        except argparse.ArgumentTypeError as err:
            parser.error(str(err))
    if args.resume_results:
        args.reuse = True
        if args.out and args.out.resolve() != args.resume_results.resolve():
            parser.error("--out and --resume-results name different files; give one")
        args.out = args.resume_results
    return args


def _recorded_sections(path: Path | None) -> list[str] | None:
    """The sections a results file was run with (None: no readable file)."""
    try:
        return list(json.loads(path.read_text())["settings"]["sections"])
    except (AttributeError, OSError, ValueError, KeyError, TypeError):
        return None  # no file: --resume-results reports it with the other checks


def summarize_file(args) -> None:
    try:
        report = json.loads(args.summarize.read_text())
    except (OSError, ValueError) as err:
        raise SystemExit(f"quality_bench: error: --summarize {args.summarize}: cannot read a "
                         f"results file ({err})") from err
    report["summary"] = reporting.summarise(report)
    print(reporting.markdown(report))
    for other_path in args.against or []:
        try:
            other = json.loads(other_path.read_text())
        except (OSError, ValueError) as err:
            raise SystemExit(f"quality_bench: error: --against {other_path}: cannot read a "
                             f"results file ({err})") from err
        print("\n".join(reporting.treated_versus(report, other, other_path.name)))
    folder = ROOT / "docs" / "figures" if args.figures is None else args.figures
    if folder:
        for path in reporting.write_figures(report, Path(folder), args.summarize.stem):
            print(f"figure: {path}")


def merge_files(args) -> None:
    report = merge_results(args.merge)
    report["summary"] = reporting.summarise(report)
    write_json_atomic(args.out, report)
    print(reporting.markdown(report))
    print(f"quality_bench: {len(report['runs'])} runs from {len(args.merge)} files, "
          f"status {report['status']} -> {args.out}")


def population_seeds(args) -> dict:
    """The population seeds the sections use (the plateau's only with its section, so
    files written before it existed resume)."""
    return {name: seed for name, seed in POPULATION_SEEDS.items()
            if name != "plateau" or "plateau" in args.sections}


def fingerprint(args, config) -> dict:
    """What must match for ``--resume-results`` to reuse finished runs."""
    finetune = {}
    for mode in ("probe", "full"):
        values = finetune_config(args, mode, 0).to_dict()
        finetune[mode] = {k: v for k, v in values.items() if k != "run"}
    pretrain = {k: v for k, v in config.to_dict().items() if k != "run"}
    # Only when used, so that older results files keep matching (--resume-results).
    used = {} if args.pretrained_step is None else {"pretrained_step": args.pretrained_step}
    if "plateau" in args.sections:
        used["plateau"] = {**plateau_recipe(args), "cases": args.plateau_cases,
                           "shape": list(args.plateau_shape),
                           "seed": POPULATION_SEEDS["plateau"]}
    return json.loads(json.dumps({
        **used, "pretrain": pretrain, "pretrain_seed": args.seed, "finetune": finetune,
        "populations": {"seeds": population_seeds(args), "shape": list(args.phantom_shape),
                        "n_pretrain": args.n_pretrain, "n_heldout": args.n_heldout,
                        "n_pool": args.n_pool}}))


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.summarize:
        summarize_file(args)
        return
    if args.merge:
        merge_files(args)
        return
    started = time.perf_counter()

    import_package("voco_core.inference", "voco_core.models", threads=args.threads)
    from voco_core.data.datalists import load_datalist
    from voco_core.errors import VoCoError

    if args.resume_results and args.work is None and args.resume_results.is_file():
        recorded = json.loads(args.resume_results.read_text()).get("work")
        args.work = Path(recorded) if recorded else None
    temporary = args.work is None
    work = args.work or Path(tempfile.mkdtemp(prefix="voco-quality-"))
    work.mkdir(parents=True, exist_ok=True)
    device_name = "cuda" if args.device.startswith("cuda") else args.device
    preset_tag = "" if args.preset == "tiny" else f"_{args.preset}"
    out = args.out or (work / "quality_eval_quick.json" if args.quick else
                       ROOT / "benchmarks" / "results" / f"quality_eval_{device_name}"
                       f"{preset_tag}.json")
    figures = (work if args.quick else ROOT / "docs" / "figures") if args.figures is None \
        else args.figures

    try:
        config = pretrain_config(args, args.pretrain_steps)
        report = {
            **report_header("quality_bench (paired evaluation)", args, work, temporary,
                            skip=("figures",)),
            "fingerprint": fingerprint(args, config),
            "dice": "held-out Dice on the finetuning pre-processed grid (the run's own "
                    "sliding-window validation), per class over the 10 foreground classes, "
                    "averaged over the held-out phantoms; mean_dice is the mean over classes",
            "timings_s": {},
        }
        store = ResultStore(out, report, resume=args.resume_results is not None,
                            overwrite=args.overwrite)
        timings = report["timings_s"]
        log(f"quality_bench: preset {args.preset} on {args.device}, work {work}, "
            f"results {out}")

        t = time.perf_counter()
        folders = make_populations(args, work)
        timings["phantoms"] = round(time.perf_counter() - t, 1)

        heldout = heldout_entries(folders["heldout"], args.n_heldout)
        if args.control_from:
            modes = [m for m in ("probe", "full") if m in args.sections]
            wanted = {run_key(m, shots, seed, INITS[m][0]) for m in modes
                      for shots in args.shots
                      for seed in range(args.first_seed, args.first_seed + args.seeds)}
            copied = copy_controls(store, args.control_from,
                                   {m: INITS[m][0] for m in modes}, wanted)
            log(f"--control-from: {copied} control runs from {args.control_from}")
        pool = load_datalist(folders["pool"], require_labels=True)
        # Modes in the order --sections names them (a lever may want its full runs
        # first); per seed the control, then VoCo (the pairs a partial file holds).
        planned = []
        for mode in [m for m in args.sections if m in ("probe", "full")]:
            for shots in args.shots:
                for seed in range(args.first_seed, args.first_seed + args.seeds):
                    chosen = choose_subjects(len(pool), shots, seed)
                    config_of_run = finetune_config(args, mode, seed)  # checked up front
                    for init in INITS[mode]:
                        key = run_key(mode, shots, seed, init)
                        if not store.done(key):
                            planned.append((key, init, config_of_run, [pool[i] for i in chosen],
                                            [f"pool/phantom_{i:03d}" for i in chosen]))

        with Jobs(args.jobs, args.threads) as jobs:
            runs_dir = work / f"finetune_{out.stem}"

            def submit_runs(rows, checkpoint):
                return [jobs.submit(finetune_job, key, config_of_run, entries, subjects,
                                    heldout, checkpoint if init == "voco" else None,
                                    runs_dir / key.replace("/", "_"))
                        for key, init, config_of_run, entries, subjects in rows]

            def record(handle):  # saved as each run ends: a stopped evaluation keeps it
                if isinstance(handle.result(), str):  # a plateau scratch arm: in its folder
                    log(f"  plateau {handle.result()}: finished (the plateau section reads "
                        "it back)")
                    return
                key, row = handle.result()
                store.add(key, row)
                curve = ", ".join(f"{p['step']}: {p['mean_dice']}" for p in row["curve"])
                log(f"  {key}: Dice {curve} ({row['seconds']} s, "
                    f"{row['median_s_per_step']} s/step)")

            t = time.perf_counter()
            log(f"pretraining: {args.pretrain_steps} steps, preset {args.preset}, teacher "
                f"{config.model.teacher}, flips/rot90 {'on' if args.spec_augment else 'off'}"
                + (f"; {args.jobs} worker processes" if jobs.parallel else ""))
            pretraining_job = jobs.submit(pretrain_or_reuse, config, folders["pretrain"],
                                          work, args.reuse)
            # In parallel, the control runs (which never load the checkpoint) go first,
            # beside the pretraining, then the plateau section's scratch arms (its VoCo
            # arms follow the pretraining, in the section); one process keeps the paired
            # order.
            early = [row for row in planned if row[1] != "voco"] if jobs.parallel else []
            later = [row for row in planned if row[1] == "voco"] if jobs.parallel else planned
            handles = submit_runs(early, None)
            if "plateau" in args.sections and jobs.parallel:
                handles += plateau_scratch_jobs(jobs, args, folders["plateau"],
                                                work / f"plateau_{out.stem}")
            for handle in jobs.finished([pretraining_job, *handles]):
                if handle is pretraining_job:
                    break
                record(handle)
                handles.remove(handle)
            pretraining = pretraining_job.result()
            timings["pretraining"] = round(time.perf_counter() - t, 1)
            report["pretraining"] = {"steps": args.pretrain_steps, "config": config.to_dict(),
                                     **{k: v for k, v in pretraining.items()
                                        if k not in ("checkpoint", "kept")}}
            log(f"pretraining: loss {pretraining['loss_first_mean']} -> "
                f"{pretraining['loss_last_mean']}, {pretraining['median_s_per_step']} s/step")
            checkpoint = pretrained_checkpoint(pretraining, args.pretrained_step)
            if args.pretrained_step is not None:
                report["pretraining"]["voco_runs_start_from_step"] = args.pretrained_step
                log(f"--pretrained-step: VoCo runs start from {checkpoint}")
            store.save()

            t = time.perf_counter()
            handles += submit_runs(later, checkpoint)
            # Positions last: the paired finetuning runs are what a partial run must hold.
            positions_job = None
            if "positions" in args.sections:
                positions_job = jobs.submit(position_section, args, config,
                                            [h.image for h in heldout], pretraining)
            for handle in jobs.finished(handles):
                record(handle)
            timings["finetuning"] = round(time.perf_counter() - t, 1)
            if positions_job is not None:
                t = time.perf_counter()
                report["positions"] = positions_job.result()
                timings["positions_after_finetuning"] = round(time.perf_counter() - t, 1)
                final = report["positions"]["pretrained"][str(args.pretrain_steps)]
                log(f"positions: top-1 same {final['same_volume']['top1']}, cross "
                    f"{final['cross_volume']['top1']} (random "
                    f"{report['positions']['random_init_mean']['cross_volume']['top1']})")
                store.save()

        if "plateau" in args.sections:  # its own worker processes (voco compare's)
            t = time.perf_counter()
            report["plateau"] = plateau_section(args, folders["plateau"], checkpoint,
                                                work / f"plateau_{out.stem}")
            timings["plateau"] = round(time.perf_counter() - t, 1)
            store.save()
    except VoCoError as err:
        raise SystemExit(f"quality_bench: error: {err}") from err

    timings["total"] = round(time.perf_counter() - started, 1)
    usage = [resource.getrusage(who) for who in (resource.RUSAGE_SELF,
                                                  resource.RUSAGE_CHILDREN)]  # + workers
    timings["cpu_user_plus_system"] = round(sum(u.ru_utime + u.ru_stime for u in usage), 1)
    store.finish(reporting.summarise(report))
    made = reporting.write_figures(report, Path(figures), out.stem) if figures else []
    if temporary and not args.quick:
        shutil.rmtree(work, ignore_errors=True)
    print(reporting.markdown(report))
    for path in made:
        print(f"figure: {path}")
    print(f"quality_bench ({args.preset}, {args.device}, {timings['total'] / 60:.1f} min) "
          f"-> {out}")


if __name__ == "__main__":
    main()
