"""Where to look next: which slices should the user annotate in the next round?

The correct-and-retrain loop as the finetune widget runs it, with an oracle user: one
labelled phantom starts with ``--first-slices`` evenly spaced axial slices annotated
(the rest ignored, label 255) and a finetuning run from scratch; each later round
adds ``--add-slices`` slices chosen by a *strategy*, the user annotates them (the
phantom's true labels on those slices) and a new run continues from the last one's
``last.pt`` for ``--round-steps`` steps (:func:`voco_core.plan.plan_continue`'s rule: whole
network, fresh schedule). Strategies:

- ``uncertainty``: :func:`voco_core.inference.rank_slices` (class-stratified
  predictive entropy of the last model's segmentation of the labelled volume; what
  the widget's *Review next* listed before this benchmark), top ``--add-slices``;
- ``random``: foreground-aware random: uniform among the unannotated slices that
  hold foreground (any labelled structure, as a user sees the body);
- ``even``: evenly spaced, nested: each new slice is the foreground slice farthest
  from every annotated one (the middle of the largest gap).

Every strategy starts from the same round-0 run of its seed; the seed picks the
labelled phantom, the first slices' offset, the random choices and the runs' seeds
(paired seeds). Held-out Dice: every run's own sliding-window validation on dense
held-out phantoms, every ``--val-every`` steps, so each round shows whether it
flattened. ``--contrast mri`` turns every phantom into an MRI-like (T1-weighted)
image: tissue intensities in another order than CT's (fat bright, fluid and air
dark, spleen darker than liver), a smooth bias field, noise, uint16, percentile
normalisation.

Usage:
    python benchmarks/review_bench.py --quick                      # smoke test, 2-3 min
    python benchmarks/review_bench.py --contrast ct --work W --out R.json   # CT, see the docs
    python benchmarks/review_bench.py --summarize FILE [FILE ...]  # tables, figure, one line
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

from quality.runs import (
    ResultStore,
    choose_subjects,
    finetune_run,
    import_package,
    log,
    report_header,
)
from quality.settings import POPULATION_SEEDS
from sparse_bench import IGNORE_LABEL, axial_axis, chosen_slices

ROOT = Path(__file__).resolve().parent.parent
STRATEGIES = ("uncertainty", "random", "even")
SETTINGS = {  # CPU, one thread: 46-53 minutes per seed and contrast (see the docs)
    "phantom_shape": (96, 96, 64), "n_heldout": 2, "n_pool": 4, "seeds": 2,
    "first_slices": 2, "add_slices": 2, "rounds": 2, "first_steps": 200,
    "round_steps": 80, "val_every": 40, "finetune_samples": 1,
}
QUICK = {"phantom_shape": (64, 64, 48), "n_heldout": 1, "n_pool": 2, "seeds": 2,
         "first_slices": 1, "add_slices": 1, "rounds": 1, "first_steps": 2,
         "round_steps": 2, "val_every": 2, "finetune_samples": 1}
MRI_T1 = {  # label -> T1-weighted signal (arbitrary units; fat ~ 1000)
    0: 0.0, 1: 850.0, 2: 600.0, 3: 250.0, 4: 60.0, 5: 560.0, 6: 420.0,
    7: 480.0, 8: 480.0, 9: 180.0, 10: 120.0,
}


# ---------------------------------------------------------------- data


def mri_like(labels, seed: int):
    """An MRI-like T1-weighted image of a phantom's label map: :data:`MRI_T1` per
    structure, 6 % Gaussian noise of the fat signal, a smooth multiplicative bias
    field (+-20 %, one period over the field of view), uint16."""
    import numpy as np
    from scipy.ndimage import gaussian_filter

    rng = np.random.default_rng(seed)
    table = np.array([MRI_T1[i] for i in range(len(MRI_T1))], np.float32)
    image = gaussian_filter(table[np.asarray(labels, np.int64)], 0.7)
    grids = np.meshgrid(*[np.linspace(0, 1, n) for n in labels.shape], indexing="ij")
    phase = rng.uniform(0, 2 * np.pi, 3)
    waves = [np.cos(np.pi * g + p) for g, p in zip(grids, phase, strict=True)]
    bias = 1 + 0.2 * np.prod(waves, axis=0)
    image = image * bias + rng.normal(0, 60.0, labels.shape)
    return np.clip(image, 0, 65535).astype(np.uint16)


def make_population(name: str, n: int, args, work: Path) -> Path:
    """Phantoms ``name`` (the quality benchmark's seeds) in ``work``, MRI-like for
    ``--contrast mri``; a folder already holding the same recipe is reused."""
    import nibabel as nib
    import numpy as np

    from voco_core.data.phantoms import make_phantom_dataset

    folder = work / f"{args.contrast}-{name}"
    recipe = {"n": n, "seed": POPULATION_SEEDS[name], "shape": list(args.phantom_shape),
              "contrast": args.contrast}
    marker = folder / "population.json"
    if marker.is_file() and json.loads(marker.read_text()) == recipe:
        return folder
    shutil.rmtree(folder, ignore_errors=True)
    make_phantom_dataset(folder, n=n, seed=recipe["seed"], shape=args.phantom_shape)
    if args.contrast == "mri":
        for index in range(n):
            label = nib.load(folder / "labelsTr" / f"phantom_{index:03d}.nii.gz")
            image = mri_like(np.asarray(label.dataobj), recipe["seed"] + index)
            nib.save(nib.Nifti1Image(image, label.affine),
                     folder / "imagesTr" / f"phantom_{index:03d}.nii.gz")
    marker.write_text(json.dumps(recipe))
    return folder


def entry(folder: Path, index: int):
    from voco_core.data.datalists import DatalistEntry

    name = f"phantom_{index:03d}.nii.gz"
    return DatalistEntry(folder / "imagesTr" / name, folder / "labelsTr" / name)


def sparse_entry(source, annotated: list[int], path: Path):
    """``source`` with only the ``annotated`` axial slices labelled (255 elsewhere)."""
    import nibabel as nib
    import numpy as np

    from voco_core.data.datalists import DatalistEntry
    from voco_core.data.sparse import slices_to_sparse

    image = nib.load(source.label)
    dense = np.asarray(image.dataobj)
    sparse = slices_to_sparse(dense, axial_axis(image.affine), IGNORE_LABEL, annotated)
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(sparse.astype(np.uint8), image.affine, image.header), path)
    return DatalistEntry(source.image, path)


# ---------------------------------------------------------------- strategies


def pick_uncertainty(run_dir: Path, source, annotated, k: int, num_classes: int) -> list[int]:
    """The top ``k`` of the widget's uncertainty ranking (:func:`rank_slices`)."""
    import nibabel as nib

    from voco_core.inference import predictive_entropy, rank_slices, segment

    result = segment(source.image, run_dir / "checkpoints" / "last.pt", device="cpu",
                     probabilities=True)
    axis = axial_axis(nib.load(source.image).affine)
    entropy = predictive_entropy(result.probabilities)
    return [row.index for row in rank_slices(entropy, result.labels, annotated, axis,
                                             num_classes, limit=k)]


def pick_random(foreground, annotated, k: int, seed: int, round_: int) -> list[int]:
    """Foreground-aware random (:func:`voco_core.inference.random_slices`), drawn
    with the generator of (seed, round)."""
    import numpy as np

    from voco_core.inference import random_slices

    rng = np.random.default_rng([seed, round_, 7])
    return sorted(random_slices(foreground, annotated, k, rng))


def pick_even(foreground, annotated, k: int) -> list[int]:
    """Evenly spaced, nested (:func:`voco_core.inference.spread_slices`)."""
    from voco_core.inference import spread_slices

    return sorted(spread_slices(foreground, annotated, k))


# ---------------------------------------------------------------- runs


class ReviewStore(ResultStore):
    """The results file, rewritten after every round (summarised at the end)."""

    def add(self, key: str, row: dict) -> None:
        self.report["runs"][key] = row
        self.save()


def finetune_config(args, steps: int, seed: int):
    """The ``tiny`` preset's finetuning recipe as users get it, with the ignore label,
    ``steps`` steps and validations every ``--val-every``."""
    from voco_core.config import make_finetune_config
    from voco_core.data.phantoms import LABEL_NAMES

    return make_finetune_config("tiny", {
        "data": {"num_classes": len(LABEL_NAMES), "ignore_label": IGNORE_LABEL,
                 "intensity": "ct" if args.contrast == "ct" else "percentile",
                 "class_names": [LABEL_NAMES[i] for i in sorted(LABEL_NAMES)]},
        "train": {"total_steps": steps, "val_every": min(args.val_every, steps),
                  "samples_per_volume": args.finetune_samples},
        "run": {"device": "cpu", "seed": seed, "tensorboard": False,
                "checkpoint_every": steps, "log_every": 10},
    })


def run_seed(args, seed: int, pool: Path, heldout: list, store: ResultStore, work: Path):
    """Round 0 once, then every strategy's rounds, continuing run to run."""
    import nibabel as nib
    import numpy as np

    from voco_core.data.phantoms import LABEL_NAMES
    from voco_core.data.sparse import annotated_slices

    index = choose_subjects(args.n_pool, 1, seed)[0]
    source = entry(pool, index)
    label = nib.load(source.label)
    foreground = annotated_slices(np.asarray(label.dataobj), axial_axis(label.affine))
    offset = float(np.random.default_rng([seed, index]).random())
    first = chosen_slices(np.flatnonzero(foreground).tolist(), args.first_slices, offset)
    runs = work / "runs" / f"seed{seed}"
    round0 = runs / "round0"
    key0 = f"seed{seed}/round0"
    if not (store.done(key0) and (round0 / "checkpoints" / "last.pt").is_file()):
        training = sparse_entry(source, first, runs / "labels" / "round0.nii.gz")
        row = finetune_run(finetune_config(args, args.first_steps, seed), [training],
                           heldout, None, round0, keep_run=True)
        store.add(key0, {**row, "subject": index, "annotated": first})
        log(f"  {key0}: {len(first)} slices, Dice {row['curve'][-1]['mean_dice']}")
    for strategy in STRATEGIES:
        annotated, parent = list(first), round0
        for round_ in range(1, args.rounds + 1):
            key = f"seed{seed}/{strategy}/round{round_}"
            run_dir = runs / strategy / f"round{round_}"
            if store.done(key) and (run_dir / "checkpoints" / "last.pt").is_file():
                annotated, parent = store.report["runs"][key]["annotated"], run_dir
                continue
            if strategy == "uncertainty":
                new = pick_uncertainty(parent, source, annotated, args.add_slices,
                                       len(LABEL_NAMES))
            elif strategy == "random":
                new = pick_random(foreground, annotated, args.add_slices, seed, round_)
            else:
                new = pick_even(foreground, annotated, args.add_slices)
            annotated = sorted(annotated + new)
            training = sparse_entry(source, annotated,
                                    runs / "labels" / f"{strategy}{round_}.nii.gz")
            row = finetune_run(finetune_config(args, args.round_steps, seed), [training],
                               heldout, None, run_dir, parent / "checkpoints" / "last.pt",
                               keep_run=True)
            store.add(key, {**row, "subject": index, "new": new, "annotated": annotated})
            log(f"  {key}: +{new} -> {len(annotated)} slices, Dice "
                f"{row['curve'][-1]['mean_dice']}")
            parent = run_dir


# ---------------------------------------------------------------- report


def summarise(report: dict) -> dict:
    """Per round: each strategy's final held-out Dice (mean over seeds), the paired
    differences between strategies, and how much each round's Dice still moved over
    its last ``--val-every`` steps."""
    import statistics

    from voco_core.evaluation.stats import paired_difference

    runs = report.get("runs", {})
    seeds = sorted({k.split("/")[0] for k in runs})
    out = {"rounds": []}
    rounds = report["settings"]["rounds"]
    for round_ in range(rounds + 1):
        row = {"round": round_, "strategies": {}}
        finals = {}
        for strategy in STRATEGIES:
            keys = [f"{s}/round0" if round_ == 0 else f"{s}/{strategy}/round{round_}"
                    for s in seeds]
            done = [runs[k] for k in keys if k in runs]
            if len(done) != len(keys) or not done:
                continue
            dice = [r["curve"][-1]["mean_dice"] for r in done]
            moved = [r["curve"][-1]["mean_dice"] - r["curve"][-2]["mean_dice"]
                     for r in done if len(r["curve"]) > 1]
            finals[strategy] = dice
            row["strategies"][strategy] = {
                "annotated": len(done[0]["annotated"]), "mean_dice": round(
                    statistics.fmean(dice), 4), "dice": dice,
                "last_change": round(statistics.fmean(moved), 4) if moved else None}
        if round_ > 0:
            row["paired"] = {f"{a} - {b}": paired_difference(finals[a], finals[b])
                             for a, b in (("uncertainty", "random"), ("uncertainty", "even"),
                                          ("random", "even"))
                             if a in finals and b in finals}
        out["rounds"].append(row)
    out["seeds"] = len(seeds)
    return out


def summary_line(report: dict) -> str:
    summary = summarise(report)
    last = summary["rounds"][-1]
    if not last.get("strategies"):
        return f"review_bench ({report['settings']['contrast']}): no finished round yet"
    parts = ", ".join(f"{name} {v['mean_dice']:.3f}" for name, v in
                      last["strategies"].items())
    slices = next(iter(last["strategies"].values()))["annotated"]
    diff = last.get("paired", {}).get("uncertainty - random", {})
    tail = (f"; uncertainty - random {diff['mean']:+.3f} [{diff['ci95_t'][0]:+.3f}, "
            f"{diff['ci95_t'][1]:+.3f}]" if diff.get("n", 0) > 1 else "")
    return (f"review_bench ({report['settings']['contrast']}, {summary['seeds']} paired "
            f"seeds): held-out Dice at {slices} slices: {parts}{tail}")


def plot(reports: list[dict], path: Path) -> Path | None:
    """Held-out Dice against annotated slices, one panel per contrast, one line per
    strategy (mean over seeds; thin lines: each seed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(reports), figsize=(5 * len(reports), 3.8), squeeze=False)
    for ax, report in zip(axes[0], reports, strict=True):
        rounds = summarise(report)["rounds"]
        for strategy, colour in zip(STRATEGIES, ("C3", "C0", "C2"), strict=True):
            points = [(r["strategies"][strategy]["annotated"], r["strategies"][strategy])
                      for r in rounds if strategy in r["strategies"]]
            if not points:
                continue
            x = [p[0] for p in points]
            ax.plot(x, [p[1]["mean_dice"] for p in points], "o-", color=colour,
                    label=strategy)
            for seed in range(len(points[0][1]["dice"])):
                ax.plot(x, [p[1]["dice"][seed] for p in points], "-", color=colour,
                        alpha=0.25, lw=0.8)
        contrast = report["settings"]["contrast"]
        ax.set_title("CT phantoms" if contrast == "ct" else "MRI-like phantoms")
        ax.set_xticks(sorted({p["strategies"][n]["annotated"] for p in rounds
                              for n in p["strategies"]}))
        ax.set_xlabel("annotated axial slices (one volume)")
        ax.set_ylabel("held-out mean Dice")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def class_coverage(report: dict) -> dict[str, int]:
    """Per run: how many of the 10 foreground classes the annotated slices show (read
    from the labelled phantom in the report's work folder; empty where it is gone)."""
    import nibabel as nib
    import numpy as np

    work, contrast = report.get("work"), report["settings"]["contrast"]
    out = {}
    for key, row in report.get("runs", {}).items():
        path = Path(work or "") / f"{contrast}-pool" / "labelsTr" / \
            f"phantom_{row['subject']:03d}.nii.gz"
        if not work or not path.is_file():
            continue
        label = nib.load(path)
        dense = np.moveaxis(np.asarray(label.dataobj), axial_axis(label.affine), 0)
        out[key] = int(np.count_nonzero(np.unique(dense[row["annotated"]])))
    return out


def coverage_markdown(report: dict) -> str:
    """Mean classes shown by the annotated slices, per round and strategy."""
    import statistics

    coverage = class_coverage(report)
    if not coverage:
        return ""
    lines = ["| round | " + " | ".join(STRATEGIES) + " |", "|---" * 4 + "|"]
    for round_ in range(report["settings"]["rounds"] + 1):
        cells = []
        for strategy in STRATEGIES:
            suffix = "/round0" if round_ == 0 else f"/{strategy}/round{round_}"
            values = [v for k, v in coverage.items() if k.endswith(suffix)]
            cells.append(f"{statistics.fmean(values):.1f}" if values else "-")
        lines.append(f"| {round_} | " + " | ".join(cells) + " |")
    return "classes (of 10) in the annotated slices:\n" + "\n".join(lines)


def pooled_line(reports: list[dict]) -> str:
    """The last round's paired differences over the seeds of every report (contrasts
    pooled: each seed of each contrast one pair)."""
    from voco_core.evaluation.stats import paired_difference

    finals: dict[str, list[float]] = {name: [] for name in STRATEGIES}
    for report in reports:
        last = summarise(report)["rounds"][-1]["strategies"]
        if set(last) != set(STRATEGIES):
            return "pooled: a report has no finished last round"
        for name in STRATEGIES:
            finals[name] += last[name]["dice"]
    parts = []
    for a, b in (("random", "uncertainty"), ("random", "even"), ("even", "uncertainty")):
        d = paired_difference(finals[a], finals[b])
        parts.append(f"{a} - {b} {d['mean']:+.3f} [{d['ci95_t'][0]:+.3f}, "
                     f"{d['ci95_t'][1]:+.3f}] ({d['wins']}/{d['n']})")
    return f"pooled over {len(finals['random'])} pairs, last round: " + "; ".join(parts)


def markdown(report: dict) -> str:
    lines = ["| round | annotated slices | " + " | ".join(STRATEGIES) +
             " | uncertainty - random | uncertainty - even |", "|---" * 6 + "|"]
    for row in summarise(report)["rounds"]:
        s = row["strategies"]
        if not s:
            continue
        cells = [f"{s[n]['mean_dice']:.3f}" if n in s else "-" for n in STRATEGIES]
        diffs = []
        for name in ("uncertainty - random", "uncertainty - even"):
            d = row.get("paired", {}).get(name)
            diffs.append(f"{d['mean']:+.3f} [{d['ci95_t'][0]:+.3f}, {d['ci95_t'][1]:+.3f}]"
                         if d and d.get("n", 0) > 1 else "-")
        slices = next(iter(s.values()))["annotated"]
        lines.append(f"| {row['round']} | {slices} | " + " | ".join(cells + diffs) + " |")
    return "\n".join(lines)


# ---------------------------------------------------------------- main


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="review_bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--contrast", choices=("ct", "mri"), default="ct")
    parser.add_argument("--quick", action="store_true", help="smoke test, tiny sizes")
    parser.add_argument("--work", type=Path, help="phantoms and runs (default: a temp folder)")
    parser.add_argument("--out", type=Path, help="results JSON (default: the work folder)")
    parser.add_argument("--resume", action="store_true",
                        help="continue --out: keep its finished rounds (same settings)")
    parser.add_argument("--summarize", type=Path, nargs="+", metavar="FILE",
                        help="only print the tables of FILE(s) and write --figure")
    parser.add_argument("--figure", type=Path, help="figure path (with --summarize)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    d = argparse.SUPPRESS
    for name in SETTINGS:
        flag = "--" + name.replace("_", "-")
        if name == "phantom_shape":
            parser.add_argument(flag, type=int, nargs=3, default=d)
        else:
            parser.add_argument(flag, type=int, default=d)
    args = parser.parse_args(argv)
    for key, value in {**SETTINGS, **(QUICK if args.quick else {})}.items():
        if not hasattr(args, key):
            setattr(args, key, value)
    args.phantom_shape = tuple(args.phantom_shape)
    for name in SETTINGS:
        if name != "phantom_shape" and getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} {getattr(args, name)}: expected >= 1")
    if args.resume and not args.out:
        parser.error("--resume needs --out (the results file to continue)")
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.summarize:
        reports = []
        for path in args.summarize:
            try:
                reports.append(json.loads(path.read_text()))
            except (OSError, ValueError) as err:
                raise SystemExit(f"review_bench: error: --summarize {path}: cannot read a "
                                 f"results file ({err})") from err
        for report in reports:
            print(markdown(report))
            print(coverage_markdown(report))
            print(summary_line(report))
        if len(reports) > 1:
            print(pooled_line(reports))
        if args.figure:
            print(f"figure: {plot(reports, args.figure)}")
        return
    if args.out and args.out.exists() and not args.resume:
        raise SystemExit(f"review_bench: error: --out {args.out} exists; continue it with "
                         "--resume, or choose another --out")
    started = time.perf_counter()
    import_package("voco_core.inference", "voco_core.data.sparse", threads=args.threads)
    from voco_core.errors import VoCoError

    work = args.work or Path(tempfile.mkdtemp(prefix="voco-review-"))
    work.mkdir(parents=True, exist_ok=True)
    out = args.out or work / f"review_bench_{args.contrast}.json"
    report = report_header("review_bench (held-out Dice against annotated slices, by the "
                           "strategy that chose them)", args, work, args.work is None,
                           skip=("summarize", "figure", "resume"))
    report["fingerprint"] = {k: report["settings"][k] for k in [*SETTINGS, "contrast"]}
    store = ReviewStore(out, report, resume=args.resume, prog="review_bench")
    try:
        pool = make_population("pool", args.n_pool, args, work)
        heldout_folder = make_population("heldout", args.n_heldout, args, work)
        heldout = [entry(heldout_folder, i) for i in range(args.n_heldout)]
        log(f"review_bench ({args.contrast}): work {work}, results {out}")
        for seed in range(args.seeds):
            run_seed(args, seed, pool, heldout, store, work)
    except VoCoError as err:
        raise SystemExit(f"review_bench: error: {err}") from err
    report["total_s"] = round(time.perf_counter() - started, 1)
    store.finish(summarise(report))
    print(markdown(report))
    print(summary_line(report))
    print(f"review_bench ({report['total_s'] / 60:.1f} min) -> {out}", file=sys.stderr)


if __name__ == "__main__":
    main()
