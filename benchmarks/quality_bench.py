"""Quality: does VoCo pretraining help? Position prediction and few-shot segmentation
on held-out phantoms, before vs after pretraining, beside simple baselines.

Sections (one run, one process):

1. Phantoms (in ``--work``, default a temp folder): an unlabelled pretraining
   population, held-out subjects, and a labelled pool for few-shot finetuning;
   three different population seeds, so no subject is shared.
2. Pretraining (``tiny`` on CPU, ``base`` with ``--preset base --device cuda``);
   the student is kept every ``--eval-every`` steps. With ``tiny`` the spec's per-crop
   flips and rot90 are off (``--spec-augment`` turns them on; the intensity shift
   stays): with them the loss barely moves in a CPU budget (see ``voco demo``).
3. Position prediction on the held-out subjects, two protocols:
   *same-volume* (sub-volumes against the base crops of their own volume; partly
   solvable by matching voxels) and *cross-volume* (sub-volumes of subject A against
   the base crops of subject B, the label from grid coordinates alone; solvable only
   with an anatomical position prior). Top-1 accuracy (argmax predicted = argmax
   true overlap) and the mean absolute error of the overlap vector for: the
   pretrained student at every kept step, randomly initialised networks (the step-0
   network and others), a raw-intensity cosine baseline (relu'd cosine of the
   flattened network-input crops), a constant prior (the mean overlap vector of
   the sampling geometry) and chance (1/K). Sub-volumes are scored in batches of
   ``m`` beside the ``K`` base crops, as in training (the projection head's
   BatchNorm uses batch statistics); one extra row scores them all in one batch.
4. Few-shot segmentation: SwinUNETR finetuned on 2 (and 4) labelled phantoms from
   scratch vs from the VoCo backbone, identical budget, ``--seeds`` seeds (the seed
   also picks the training subjects; both inits get the same subjects and seed).
   Dice on the held-out phantoms with :func:`voco_core.inference.segment` on the
   source voxel grid (the finetune's own end-of-run validation Dice, on the same
   subjects in its pre-processed grid, is recorded beside it as a cross-check).
5. Ablations (``--ablations``): short pretraining variants scored on positions.

Usage:
    python benchmarks/quality_bench.py                     # CPU default, ~40 min on 2 cores
    python benchmarks/quality_bench.py --quick             # smoke test, ~2 min
    python benchmarks/quality_bench.py --preset base --device cuda   # ~1 hour on one H200
    python benchmarks/quality_bench.py --work W --reuse --sections fewshot \
        --finetune-steps 100 --out /tmp/ft100.json         # again, on W's pretraining run

Writes ``benchmarks/results/quality_bench_<device>.json`` (numbers, settings,
timings, versions), ``docs/figures/quality_*.png`` and prints one summary line.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# Per-preset defaults; every one can be changed from the command line.
SETTINGS = {
    "tiny": {  # CPU, 2 cores: ~40 minutes in all
        "phantom_shape": (96, 96, 64), "n_pretrain": 16, "n_heldout": 4, "n_pool": 6,
        "pretrain_steps": 250, "eval_every": 50, "teacher": "head", "spec_augment": False,
        "sub_volumes": 16, "random_inits": 3, "finetune_steps": 40, "seeds": 3,
        "shots": "2,4", "ablations": "lr1e-3",
    },
    "base": {  # one GPU: the authors' geometry and model size, still a short run
        "phantom_shape": (160, 160, 96), "n_pretrain": 32, "n_heldout": 8, "n_pool": 8,
        "pretrain_steps": 3000, "eval_every": 500, "teacher": "head", "spec_augment": True,
        "sub_volumes": 32, "random_inits": 3, "finetune_steps": 600, "seeds": 3,
        "shots": "2,4", "ablations": "teacher-full,no-flip-rot90",
    },
}
QUICK = {"n_pretrain": 3, "n_heldout": 2, "n_pool": 3, "pretrain_steps": 6, "eval_every": 3,
         "sub_volumes": 4, "random_inits": 1, "finetune_steps": 3, "seeds": 1, "shots": "2"}
QUICK_ABLATION_STEPS = 2

# Pretraining variants for the ablation section: (overrides, steps as a share of the
# main run's). Scored on positions only, beside the main run's student at that step.
ABLATIONS = {
    "lr1e-3": ({"optim": {"lr": 1e-3}}, 0.5),
    "lr3e-5": ({"optim": {"lr": 3e-5}}, 0.5),
    "teacher-full": ({"model": {"teacher": "full"}}, 0.5),
    "teacher-none": ({"model": {"teacher": "none"}}, 0.5),
    "flip-rot90": ({"augment": {"flip_prob": 0.2, "rot90_prob": 0.2}}, 0.5),
    "no-flip-rot90": ({"augment": {"flip_prob": 0.0, "rot90_prob": 0.0}}, 0.5),
}
POPULATION_SEEDS = {"pretrain": 1001, "heldout": 2002, "pool": 3003}


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def spread(values: list[float]) -> dict:
    values = [float(v) for v in values]
    return {"mean": round(statistics.fmean(values), 4),
            "std": round(statistics.stdev(values), 4) if len(values) > 1 else 0.0,
            "min": round(min(values), 4), "max": round(max(values), 4), "n": len(values)}


# ---------------------------------------------------------------- configs


def pretrain_config(args, run_seed: int, steps: int, extra: dict | None = None):
    from voco_core.config import make_config, merge

    overrides = {
        "data": {"cache": "memory"},
        "model": {"teacher": args.teacher},
        "optim": {"total_steps": steps, "warmup_steps": max(5, steps // 20)},
        "run": {"device": args.device, "seed": run_seed, "tensorboard": False,
                "deterministic": False, "checkpoint_every": args.eval_every,
                "log_every": 1},
    }
    if args.pretrain_lr:
        overrides["optim"]["lr"] = args.pretrain_lr
    if not args.spec_augment:  # intensity shift only (see the module doc)
        overrides["augment"] = {"flip_prob": 0.0, "rot90_prob": 0.0}
    return make_config(args.preset, merge(overrides, extra or {}))


def finetune_config(args, seed: int):
    from voco_core.config import make_finetune_config
    from voco_core.data.phantoms import LABEL_NAMES

    steps = args.finetune_steps
    return make_finetune_config(args.preset, {
        "data": {"num_classes": len(LABEL_NAMES),
                 "class_names": [LABEL_NAMES[i] for i in sorted(LABEL_NAMES)]},
        "train": {"total_steps": steps, "warmup_steps": max(1, steps // 10),
                  "val_every": steps},
        "run": {"device": args.device, "seed": seed, "tensorboard": False,
                "deterministic": False, "checkpoint_every": steps, "log_every": 10},
    })


# ---------------------------------------------------------------- pretraining


def run_pretraining(args, config, data, run_dir: Path, keep_dir: Path | None) -> dict:
    """Pretrain; copy the student checkpoint at every save into ``keep_dir``."""
    from voco_core.train.pretrain import pretrain

    if keep_dir is not None:
        keep_dir.mkdir(parents=True, exist_ok=True)
    kept: dict[int, str] = {}
    total = config.optim.total_steps

    def callback(event):
        if event.kind == "step" and event.checkpoint and keep_dir is not None:
            target = keep_dir / f"step_{event.step:05d}.pt"
            shutil.copyfile(event.checkpoint, target)
            kept[event.step] = str(target)
        if event.kind == "step" and (event.step % max(1, total // 10) == 0 or event.step == 1):
            log(f"  pretrain step {event.step}/{total}: loss {event.loss:.4f} "
                f"({event.seconds_per_step:.2f} s/step)")

    start = time.perf_counter()
    result = pretrain(config, data, run_dir, callback=callback)
    seconds = time.perf_counter() - start
    steps = [e for e in result.history if e.kind == "step"]
    walls = [e.seconds_per_step for e in steps[1:]] or [math.nan]
    return {
        "checkpoint": str(result.checkpoint), "kept": kept, "seconds": round(seconds, 1),
        "median_s_per_step": round(statistics.median(walls), 3),
        "peak_memory_gib": round(steps[-1].peak_memory_bytes / 2**30, 2),
        "curve": {key: [round(float(getattr(e, key)), 5) for e in steps]
                  for key in ("loss", "pos", "neg", "reg", "lr")},
    }


def reuse_pretraining(config, run_dir: Path, keep_dir: Path) -> dict | None:
    """A finished run of this very config in ``run_dir`` (``--reuse``), else None.

    The loss curve comes from the run's ``log.jsonl``; its time is the sum of the
    logged step times (checkpoint writes and start-up not counted)."""
    from voco_core.checkpoint import load_pretrain_checkpoint
    from voco_core.train.pretrain import read_log

    last = run_dir / "checkpoints" / "last.pt"
    if not last.is_file() or not (run_dir / "log.jsonl").is_file():
        return None
    state = load_pretrain_checkpoint(last)
    mine = {k: v for k, v in config.to_dict().items() if k != "run"}
    theirs = {k: v for k, v in state["config"].items() if k != "run"}
    if mine != theirs or state["step"] != config.optim.total_steps:
        log(f"--reuse: {run_dir} holds another run (step {state['step']}); pretraining anew")
        return None
    records = read_log(run_dir / "log.jsonl")
    kept = {int(p.stem.split("_")[1]): str(p) for p in sorted(keep_dir.glob("step_*.pt"))}
    walls = [r["seconds_per_step"] for r in records[1:]] or [math.nan]
    return {
        "checkpoint": str(last), "kept": kept, "reused": str(run_dir),
        "seconds": round(sum(r["seconds_per_step"] for r in records), 1),
        "median_s_per_step": round(statistics.median(walls), 3),
        "peak_memory_gib": round(records[-1]["peak_memory_bytes"] / 2**30, 2),
        "curve": {key: [round(float(r[key]), 5) for r in records]
                  for key in ("loss", "pos", "neg", "reg", "lr")},
    }


# ---------------------------------------------------------------- positions


def random_position_model(config, seed: int, device: str):
    """A randomly initialised student; ``seed`` = the run seed gives exactly the
    network pretraining started from (VoCoModel builds its student first)."""
    import torch

    from voco_core.config import resolve_device
    from voco_core.inference import PositionModel
    from voco_core.models import VoCoNet

    torch.manual_seed(seed)
    torch_device = resolve_device(device)
    net = VoCoNet(config.model).to(torch_device).eval()
    return PositionModel(net, config, torch_device, f"random init (seed {seed})", 0)


def draw_protocol_boxes(prepared, config, n_sub: int, batch: int) -> list[list]:
    """Per held-out volume, ``n_sub // batch`` lists of sample boxes (the same for
    every model, so comparisons are paired)."""
    import numpy as np

    from voco_core.geometry import crop_boxes_from_centres, sample_crop_centres

    out = []
    for index, volume in enumerate(prepared):
        size = tuple(volume.sample.shape[1:])
        rng = np.random.default_rng([7, index])
        out.append([crop_boxes_from_centres(
            sample_crop_centres(rng, size, config.random_crop_size, batch),
            config.random_crop_size, size) for _ in range(max(1, n_sub // batch))])
    return out


def score_model(model, prepared, boxes, cross: bool, one_batch: bool = False) -> dict:
    """Top-1 and MAE over all held-out volumes for one protocol."""
    import numpy as np

    from voco_core.inference import positions

    predicted, true = [], []
    for index, volume in enumerate(prepared):
        base = prepared[(index + 1) % len(prepared)] if cross else None
        groups = [np.concatenate(boxes[index])] if one_batch else boxes[index]
        for group in groups:
            result = positions(volume, model, volume.boxes_to_image(group), base_volume=base)
            if not np.array_equal(result.sample_boxes, group):  # the image round trip
                raise RuntimeError("positions() did not score the boxes it was given")
            predicted.append(result.predicted)
            true.append(result.true)
    return metrics(np.concatenate(predicted), np.concatenate(true))


def metrics(predicted, true) -> dict:
    import numpy as np

    correct = predicted.argmax(axis=1) == true.argmax(axis=1)
    p = float(correct.mean())
    return {"top1": round(p, 4), "mae": round(float(np.abs(predicted - true).mean()), 4),
            "n": len(correct), "top1_se": round(math.sqrt(p * (1 - p) / len(correct)), 4)}


def score_raw_cosine(config, prepared, boxes, cross: bool) -> dict:
    """relu(cos) of the flattened network-input crops (``crops_for_network``)."""
    import numpy as np
    import torch.nn.functional as F

    from voco_core.geometry import base_crop_grid, overlap_labels
    from voco_core.inference import crops_for_network

    s = config.geometry.input_size
    predicted, true = [], []
    for index, volume in enumerate(prepared):
        base = prepared[(index + 1) % len(prepared)] if cross else volume
        grid = base_crop_grid(volume.sample.shape[1:], config.geometry.grid_size)
        bases = F.normalize(crops_for_network(base.sample, grid, s).flatten(1), dim=1)
        group = np.concatenate(boxes[index])
        subs = F.normalize(crops_for_network(volume.sample, group, s).flatten(1), dim=1)
        predicted.append(F.relu(subs @ bases.T).numpy())
        true.append(overlap_labels(group, grid))
    return metrics(np.concatenate(predicted), np.concatenate(true))


def score_prior(config, prepared, boxes) -> dict:
    """A constant prediction: the mean overlap vector of the sampling geometry
    (Monte Carlo, its own draws); its argmax is the centre cell."""
    import numpy as np

    from voco_core.geometry import (
        base_crop_grid,
        crop_boxes_from_centres,
        overlap_labels,
        sample_crop_centres,
    )

    size = tuple(prepared[0].sample.shape[1:])
    grid = base_crop_grid(size, config.geometry.grid_size)
    draws = crop_boxes_from_centres(sample_crop_centres(
        np.random.default_rng(12345), size, config.random_crop_size, 20000),
        config.random_crop_size, size)
    prior = overlap_labels(draws, grid).mean(axis=0)
    true = np.concatenate([overlap_labels(np.concatenate(b), grid) for b in boxes])
    out = metrics(np.broadcast_to(prior, true.shape), true)
    out["prior_vector"] = [round(float(v), 4) for v in prior]
    out["argmax_frequency_of_prior_cell"] = round(float(
        (overlap_labels(draws, grid).argmax(axis=1) == prior.argmax()).mean()), 4)
    out["zero_vector_mae"] = round(float(np.abs(true).mean()), 4)
    return out


def score_both(model, prepared, boxes) -> dict:
    return {"same_volume": score_model(model, prepared, boxes, cross=False),
            "cross_volume": score_model(model, prepared, boxes, cross=True)}


# ---------------------------------------------------------------- few-shot


def dice_per_class(prediction, truth, num_classes: int) -> list[float | None]:
    import numpy as np

    out = []
    for c in range(1, num_classes):
        p, t = prediction == c, truth == c
        denominator = int(p.sum()) + int(t.sum())
        out.append(None if denominator == 0 else
                   round(2.0 * float(np.logical_and(p, t).sum()) / denominator, 4))
    return out


def run_finetune(args, entries, heldout, seed: int, pretrained, run_dir: Path) -> dict:
    import numpy as np

    from voco_core.data.io import DatalistEntry
    from voco_core.inference import load_segmenter, segment
    from voco_core.train.finetune import finetune

    config = finetune_config(args, seed)
    start = time.perf_counter()
    result = finetune(config, entries, run_dir, pretrained=pretrained,
                      validation=[DatalistEntry(h["image_path"], h["label_path"])
                                  for h in heldout])
    train_seconds = time.perf_counter() - start
    load_message = next((e.message for e in result.history if e.kind == "start"), "")
    validation = [e for e in result.history if e.kind == "validation"]
    steps = [e for e in result.history if e.kind == "step"]
    segmenter = load_segmenter(result.best_checkpoint or result.last_checkpoint, args.device)
    per_case = []
    for case in heldout:
        labels = segment(case["image"], segmenter, device=args.device).labels
        per_case.append(dice_per_class(labels, case["label"].array,
                                       config.data.num_classes))
    segmenter.release()
    per_class = [None if all(d[c] is None for d in per_case) else
                 round(float(np.mean([d[c] for d in per_case if d[c] is not None])), 4)
                 for c in range(len(per_case[0]))]
    finite = [d for d in per_class if d is not None]
    shutil.rmtree(run_dir, ignore_errors=True)
    return {
        "dice": round(float(np.mean(finite)), 4),
        "class_dice": per_class,
        "case_dice": [round(float(np.mean([v for v in d if v is not None])), 4)
                      for d in per_case],
        "validation_dice_preprocessed_grid": (round(validation[-1].mean_dice, 4)
                                              if validation else None),
        "final_loss": round(steps[-1].loss, 4) if steps else None,
        "median_s_per_step": round(statistics.median(e.seconds_per_step for e in steps), 3),
        "seconds": round(time.perf_counter() - start, 1),
        "train_seconds": round(train_seconds, 1),
        "backbone_load": load_message.splitlines()[0] if load_message else None,
    }


# ---------------------------------------------------------------- figures


def plot_positions(report: dict, out: Path) -> Path:
    import numpy as np
    from matplotlib.figure import Figure

    pos = report["positions"]
    final = pos["pretrained"][str(max(int(s) for s in pos["pretrained"]))]
    rows = [("chance 1/K", {p: {"top1": pos["chance_top1"], "mae": None}
                             for p in ("same_volume", "cross_volume")}),
            ("constant prior", {p: pos["prior"] for p in ("same_volume", "cross_volume")}),
            ("raw-intensity cosine", pos["raw_cosine"]),
            ("random init", pos["random_init_mean"]),
            (f"VoCo, {report['pretraining']['steps']} steps", final)]
    fig = Figure(figsize=(8.5, 3.4), constrained_layout=True)
    axes = fig.subplots(1, 2)
    width = 0.8 / len(rows)
    for a, (metric, title) in enumerate((("top1", "top-1 accuracy (higher is better)"),
                                         ("mae", "mean |p - y| (lower is better)"))):
        ax = axes[a]
        for r, (name, values) in enumerate(rows):
            heights = [values[p][metric] for p in ("same_volume", "cross_volume")]
            x = np.arange(2) + (r - (len(rows) - 1) / 2) * width
            if any(h is None for h in heights):
                continue
            bars = ax.bar(x, heights, width, label=name, color=f"C{r}")
            if name == "random init":
                spans = [pos["random_init_range"][p][metric] for p in ("same_volume",
                                                                         "cross_volume")]
                ax.errorbar(x, heights, yerr=[[h - s[0] for h, s in zip(heights, spans,
                                                                             strict=True)],
                                              [s[1] - h for h, s in zip(heights, spans,
                                                                        strict=True)]],
                            fmt="none", ecolor="k", capsize=2, lw=0.8)
            ax.bar_label(bars, fmt="%.2f", fontsize=6)
        ax.set_xticks(range(2), ["same-volume", "cross-volume"])
        ax.set_title(title, fontsize=9)
    axes[0].set_ylim(0, 1)
    axes[0].legend(fontsize=7, loc="upper right")
    fig.suptitle(f"Position prediction on {report['settings']['n_heldout']} held-out "
                 f"phantoms (K = {pos['K']}, {pos['n_per_protocol']} sub-volumes per protocol)",
                 fontsize=9)
    fig.savefig(out, dpi=100)
    return out


def plot_pretraining(report: dict, out: Path) -> Path:
    import numpy as np
    from matplotlib.figure import Figure

    curve = report["pretraining"]["curve"]
    steps = np.arange(1, len(curve["loss"]) + 1)
    fig = Figure(figsize=(9, 3.3), constrained_layout=True)
    left, right = fig.subplots(1, 2)
    window = max(1, len(steps) // 12)
    left.plot(steps, curve["loss"], color="0.8", lw=0.7, label="total (per step)")
    for key, colour in (("loss", "k"), ("pos", "C0"), ("neg", "C1"), ("reg", "C2")):
        values = np.convolve(curve[key], np.ones(window) / window, mode="valid")
        left.plot(steps[window - 1:], values, color=colour,
                  label=f"{'total' if key == 'loss' else key} ({window}-step mean)")
    left.set_xlabel("optimizer step")
    left.set_ylabel("loss")
    left.set_title("VoCo pretraining loss", fontsize=9)
    left.legend(fontsize=7)
    pos = report["positions"]
    kept = sorted(int(s) for s in pos["pretrained"])
    for protocol, colour in (("same_volume", "C0"), ("cross_volume", "C3")):
        right.plot(kept, [pos["pretrained"][str(s)][protocol]["top1"] for s in kept], "o-",
                   color=colour, label=protocol.replace("_", "-"))
        right.axhline(pos["raw_cosine"][protocol]["top1"], color=colour, ls=":", lw=1,
                      label=f"raw cosine, {protocol.split('_')[0]}")
    right.axhline(pos["prior"]["top1"], color="0.5", ls="--", lw=1, label="constant prior")
    right.axhline(pos["chance_top1"], color="0.7", ls="-.", lw=1, label="chance 1/K")
    for name, ab in report.get("ablations", {}).items():
        for protocol, marker in (("same_volume", "s"), ("cross_volume", "^")):
            right.plot(ab["steps"], ab["scores"][protocol]["top1"], marker, color="C4",
                       ms=6, label=f"{name} ({protocol.split('_')[0]})")
    right.set_xlabel("pretraining step (0 = random init)")
    right.set_ylabel("top-1 accuracy")
    right.set_ylim(0, 1)
    right.set_title("held-out position top-1 vs pretraining step", fontsize=9)
    right.legend(fontsize=6, ncol=2)
    fig.savefig(out, dpi=100)
    return out


def plot_fewshot(report: dict, out: Path) -> Path:
    import numpy as np
    from matplotlib.figure import Figure

    few = report["fewshot"]
    shots = sorted(int(s) for s in few["summary"])
    fig = Figure(figsize=(4.2 + 1.3 * len(shots), 3.3), constrained_layout=True)
    ax = fig.add_subplot()
    for i, init in enumerate(("scratch", "voco")):
        x = np.arange(len(shots)) + (i - 0.5) * 0.36
        summary = [few["summary"][str(s)][init] for s in shots]
        means = [s["mean"] for s in summary]
        bars = ax.bar(x, means, 0.34, yerr=[s["std"] for s in summary], capsize=3,
                      color="C7" if init == "scratch" else "C0",
                      label="from scratch" if init == "scratch" else "VoCo backbone")
        ax.bar_label(bars, fmt="%.3f", fontsize=7, padding=6)
        for xi, s in zip(x, shots, strict=True):
            values = [r["dice"] for r in few["runs"] if r["shots"] == s and r["init"] == init]
            ax.plot(np.full(len(values), xi), values, "k.", ms=4)
    ax.set_xticks(range(len(shots)), [f"{s} training phantoms" for s in shots])
    ax.set_ylabel("mean Dice, 10 classes, held-out")
    ax.set_ylim(0, 1)
    ax.set_title(f"Few-shot SwinUNETR, {report['settings']['finetune_steps']} steps "
                 f"(mean ± std, dots: seeds)", fontsize=9)
    ax.legend(fontsize=8, loc="upper left")
    fig.savefig(out, dpi=100)
    return out


# ---------------------------------------------------------------- main


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="tiny", choices=sorted(SETTINGS),
                        help="pretraining and finetuning preset (default tiny, for CPU)")
    parser.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N")
    parser.add_argument("--quick", action="store_true", help="smoke test, ~2 minutes")
    parser.add_argument("--out", type=Path, help="results JSON")
    parser.add_argument("--figures", default=str(ROOT / "docs" / "figures"),
                        help="folder for quality_*.png ('' for none)")
    parser.add_argument("--work", type=Path, help="folder for phantoms and runs "
                        "(default: a new temp folder, deleted at the end)")
    parser.add_argument("--seed", type=int, default=0, help="pretraining run seed")
    parser.add_argument("--reuse", action="store_true",
                        help="reuse a finished pretraining run of the same config in --work")
    d = argparse.SUPPRESS  # filled from SETTINGS[preset] (and QUICK)
    parser.add_argument("--phantom-shape", type=int, nargs=3, default=d)
    parser.add_argument("--n-pretrain", type=int, default=d, help="unlabelled phantoms")
    parser.add_argument("--n-heldout", type=int, default=d, help="held-out phantoms")
    parser.add_argument("--n-pool", type=int, default=d, help="labelled few-shot pool")
    parser.add_argument("--pretrain-steps", type=int, default=d)
    parser.add_argument("--pretrain-lr", type=float, default=None,
                        help="default: the preset's")
    parser.add_argument("--eval-every", type=int, default=d,
                        help="keep and score the student every N pretraining steps")
    parser.add_argument("--teacher", choices=["full", "head", "none"], default=d)
    parser.add_argument("--spec-augment", action=argparse.BooleanOptionalAction, default=d,
                        help="per-crop flips/rot90 of the spec (default: off for tiny)")
    parser.add_argument("--sub-volumes", type=int, default=d,
                        help="sub-volumes per held-out volume and protocol")
    parser.add_argument("--random-inits", type=int, default=d)
    parser.add_argument("--finetune-steps", type=int, default=d)
    parser.add_argument("--seeds", type=int, default=d, help="few-shot seeds")
    parser.add_argument("--shots", default=d, help="comma list, e.g. 2,4 ('' to skip)")
    parser.add_argument("--sections", default="positions,fewshot,ablations",
                        help="which of positions,fewshot,ablations to run (pretraining always "
                             "runs, or is reused; ablations need positions)")
    parser.add_argument("--ablations", default=d,
                        help=f"comma list of {sorted(ABLATIONS)} ('' to skip)")
    args = parser.parse_args()
    settings = dict(SETTINGS[args.preset])
    if args.quick:
        settings.update(QUICK)
    for key, value in settings.items():
        if not hasattr(args, key):
            setattr(args, key, value)
    args.phantom_shape = tuple(args.phantom_shape)
    args.sections = {x.strip() for x in args.sections.split(",") if x.strip()}
    if args.sections - {"positions", "fewshot", "ablations"}:
        parser.error(f"unknown --sections {sorted(args.sections)}")
    args.shots = [int(s) for s in str(args.shots).split(",") if s.strip()]
    args.ablations = [a for a in str(args.ablations).split(",") if a.strip()]
    unknown = [a for a in args.ablations if a not in ABLATIONS]
    if unknown:
        parser.error(f"unknown ablation(s) {unknown}; known: {sorted(ABLATIONS)}")
    if args.shots and max(args.shots) > args.n_pool:
        parser.error(f"--shots {max(args.shots)} needs --n-pool >= {max(args.shots)}")
    return args


def main() -> None:
    args = parse_args()
    started = time.perf_counter()

    import monai
    import numpy as np
    import torch

    # Everything up front: one consistent version of the package for the whole run
    # (a lazy import an hour in could meet a source tree edited meanwhile).
    import voco_core.checkpoint
    import voco_core.train.finetune
    import voco_core.train.pretrain  # noqa: F401
    from voco_core.data.io import load_datalist, read_volume
    from voco_core.data.phantoms import LABEL_NAMES, make_phantom_dataset
    from voco_core.inference import load_position_model, prepare_volume

    device_name = "cuda" if args.device.startswith("cuda") else args.device
    out = args.out or ROOT / "benchmarks" / "results" / f"quality_bench_{device_name}.json"
    work = args.work or Path(tempfile.mkdtemp(prefix="voco-quality-"))
    work.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}
    report: dict = {
        "benchmark": "quality_bench",
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                    "python": platform.python_version(), "torch": torch.__version__,
                    "monai": monai.__version__, "numpy": np.__version__,
                    "threads": torch.get_num_threads(),
                    "cuda": (torch.cuda.get_device_name(0) if torch.cuda.is_available()
                             else None)},
        "settings": {k: (sorted(v) if isinstance(v, set) else list(v) if isinstance(v, tuple)
                         else v) for k, v in vars(args).items()
                     if k not in ("out", "figures", "work")},
    }
    report["settings"]["population_seeds"] = POPULATION_SEEDS
    log(f"quality_bench: preset {args.preset} on {args.device}, work folder {work}")

    # 1. phantoms ------------------------------------------------------------
    t = time.perf_counter()
    folders = {}
    for name, n in (("pretrain", args.n_pretrain), ("heldout", args.n_heldout),
                    ("pool", args.n_pool)):
        folders[name] = make_phantom_dataset(work / name, n=n, seed=POPULATION_SEEDS[name],
                                             shape=args.phantom_shape).parent
    heldout = []
    for i in range(args.n_heldout):
        image = folders["heldout"] / "imagesTr" / f"phantom_{i:03d}.nii.gz"
        label = folders["heldout"] / "labelsTr" / f"phantom_{i:03d}.nii.gz"
        heldout.append({"image_path": image, "label_path": label, "image": read_volume(image),
                        "label": read_volume(label, kind="label map")})
    timings["phantoms"] = round(time.perf_counter() - t, 1)
    log(f"phantoms: {args.n_pretrain} + {args.n_heldout} + {args.n_pool} of "
        f"{args.phantom_shape} in {timings['phantoms']} s")

    # 2. pretraining ---------------------------------------------------------
    t = time.perf_counter()
    config = pretrain_config(args, args.seed, args.pretrain_steps)
    log(f"pretraining: {args.pretrain_steps} steps, preset {args.preset}, teacher "
        f"{config.model.teacher}, flips/rot90 {'on' if args.spec_augment else 'off'}")
    main_run = reuse_pretraining(config, work / "pretrain_run", work / "kept") if (
        args.reuse) else None
    if main_run is not None:
        log(f"--reuse: the finished run in {work / 'pretrain_run'}")
    else:
        main_run = run_pretraining(args, config, folders["pretrain"], work / "pretrain_run",
                                   work / "kept")
    timings["pretraining"] = round(time.perf_counter() - t, 1)
    if "reused" in main_run:  # the original run's logged step time
        timings["pretraining"] = main_run["seconds"]
        timings["pretraining_reused_from_earlier_run"] = True
    report["pretraining"] = {
        "steps": args.pretrain_steps, "config": config.to_dict(),
        **{k: v for k, v in main_run.items() if k not in ("checkpoint", "kept")},
    }
    curve = main_run["curve"]["loss"]
    window = max(1, len(curve) // 10)
    report["pretraining"]["loss_first_mean"] = round(statistics.fmean(curve[:window]), 4)
    report["pretraining"]["loss_last_mean"] = round(statistics.fmean(curve[-window:]), 4)
    report["pretraining"]["loss_window"] = window

    # 3. positions -----------------------------------------------------------
    positions: dict | None = None
    last: dict | None = None
    if "positions" in args.sections:
        t = time.perf_counter()
        prepared = [prepare_volume(h["image"], config) for h in heldout]
        m = config.geometry.num_random_crops
        boxes = draw_protocol_boxes(prepared, config, args.sub_volumes, m)
        positions = {"K": config.num_base_crops, "chance_top1": round(1 / config.num_base_crops, 4),
                     "batch": f"K = {config.num_base_crops} base crops + m = {m} sub-volumes",
                     "n_per_protocol": sum(len(np.concatenate(b)) for b in boxes)}
        positions["prior"] = score_prior(config, prepared, boxes)
        positions["raw_cosine"] = {
            "same_volume": score_raw_cosine(config, prepared, boxes, cross=False),
            "cross_volume": score_raw_cosine(config, prepared, boxes, cross=True)}
        random_rows = {}
        for r in range(args.random_inits):
            model = random_position_model(config, args.seed + r, args.device)
            random_rows[str(args.seed + r)] = score_both(model, prepared, boxes)
        positions["random_init"] = random_rows
        positions["random_init_mean"] = {
            p: {k: round(statistics.fmean(row[p][k] for row in random_rows.values()), 4)
                for k in ("top1", "mae")} for p in ("same_volume", "cross_volume")}
        positions["random_init_range"] = {
            p: {k: [min(row[p][k] for row in random_rows.values()),
                    max(row[p][k] for row in random_rows.values())] for k in ("top1", "mae")}
            for p in ("same_volume", "cross_volume")}
        positions["pretrained"] = {"0": random_rows[str(args.seed)]}
        for step, path in sorted(main_run["kept"].items()):
            model = load_position_model(path, args.device)
            positions["pretrained"][str(step)] = score_both(model, prepared, boxes)
        final_model = load_position_model(main_run["checkpoint"], args.device)
        positions["pretrained_one_batch"] = {
            "note": f"all sub-volumes of a volume in one batch beside the K base crops "
                    f"(instead of m = {m} at a time)",
            "same_volume": score_model(final_model, prepared, boxes, cross=False, one_batch=True),
            "cross_volume": score_model(final_model, prepared, boxes, cross=True, one_batch=True)}
        timings["positions"] = round(time.perf_counter() - t, 1)
        report["positions"] = positions
        last = positions["pretrained"][str(args.pretrain_steps)]
        rows = {"VoCo": last, "random": positions["random_init_mean"],
                "raw cosine": positions["raw_cosine"]}
        log(f"positions ({timings['positions']} s), top-1: " + "; ".join(
            f"{p}: " + ", ".join(f"{name} {row[p]['top1']}" for name, row in rows.items())
            for p in ("same_volume", "cross_volume")) + f"; prior {positions['prior']['top1']}")

    # 4. few-shot segmentation -----------------------------------------------
    t = time.perf_counter()
    pool = load_datalist(folders["pool"], require_labels=True)
    runs = []
    for shots in args.shots if "fewshot" in args.sections else []:
        for seed in range(args.seeds):
            chosen = sorted(np.random.default_rng([seed, shots]).choice(
                len(pool), size=shots, replace=False).tolist())
            for init in ("scratch", "voco"):
                row = run_finetune(args, [pool[i] for i in chosen], heldout, seed,
                                   main_run["checkpoint"] if init == "voco" else None,
                                   work / f"ft_{shots}_{seed}_{init}")
                runs.append({"shots": shots, "seed": seed, "init": init,
                             "subjects": [f"pool/phantom_{i:03d}" for i in chosen], **row})
                log(f"  few-shot {shots} shots, seed {seed}, {init}: Dice {row['dice']} "
                    f"(validation {row['validation_dice_preprocessed_grid']}, "
                    f"{row['seconds']} s)")
    summary = {}
    for shots in sorted({r["shots"] for r in runs}):
        by_init = {init: [r["dice"] for r in runs if r["shots"] == shots and r["init"] == init]
                   for init in ("scratch", "voco")}
        diffs = [v - s for s, v in zip(by_init["scratch"], by_init["voco"], strict=True)]
        summary[str(shots)] = {**{init: spread(v) for init, v in by_init.items()},
                               "voco_minus_scratch": spread(diffs),
                               "voco_wins": sum(d > 0 for d in diffs)}
    timings["fewshot"] = round(time.perf_counter() - t, 1)
    report["fewshot"] = {
        "dice": "mean over the 10 foreground classes of the per-class Dice averaged over the "
                "held-out phantoms, computed on the source voxel grid from "
                "voco_core.inference.segment",
        "class_names": [LABEL_NAMES[i] for i in sorted(LABEL_NAMES)][1:],
        "finetune_config": finetune_config(args, 0).to_dict(),
        "runs": runs, "summary": summary}

    # 5. ablations -----------------------------------------------------------
    t = time.perf_counter()
    report["ablations"] = {}
    for name in args.ablations if positions is not None else []:
        extra, share = ABLATIONS[name]
        steps = QUICK_ABLATION_STEPS if args.quick else max(1, round(share * args.pretrain_steps))
        ab_config = pretrain_config(args, args.seed, steps, extra)
        ab_config.run.checkpoint_every = steps
        log(f"ablation {name}: {steps} steps")
        ab = run_pretraining(args, ab_config, folders["pretrain"], work / f"ablation_{name}",
                             None)
        scores = score_both(load_position_model(ab["checkpoint"], args.device), prepared, boxes)
        nearest = min(positions["pretrained"], key=lambda s: abs(int(s) - steps))
        report["ablations"][name] = {
            "overrides": extra, "steps": steps, "scores": scores,
            "main_run_at_step": int(nearest),
            "main_run_scores": positions["pretrained"][nearest],
            "loss_first_mean": round(statistics.fmean(ab["curve"]["loss"][:max(1, steps // 10)]),
                                     4),
            "loss_last_mean": round(statistics.fmean(ab["curve"]["loss"][-max(1, steps // 10):]),
                                    4),
            "median_s_per_step": ab["median_s_per_step"], "seconds": ab["seconds"]}
        log(f"  {name}: same {scores['same_volume']['top1']}, cross "
            f"{scores['cross_volume']['top1']} (main run at step {nearest}: "
            f"{positions['pretrained'][nearest]['same_volume']['top1']}, "
            f"{positions['pretrained'][nearest]['cross_volume']['top1']})")
    timings["ablations"] = round(time.perf_counter() - t, 1)

    timings["total"] = round(time.perf_counter() - started, 1)
    report["timings_s"] = timings
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")

    figures = []
    if args.figures:
        args.figures = Path(args.figures)
        args.figures.mkdir(parents=True, exist_ok=True)
        suffix = "" if args.preset == "tiny" and not args.quick else f"_{args.preset}" + (
            "_quick" if args.quick else "")
        if positions is not None:
            figures.append(plot_positions(report, args.figures / f"quality_positions{suffix}.png"))
            figures.append(plot_pretraining(report,
                                            args.figures / f"quality_pretraining{suffix}.png"))
        if runs:
            figures.append(plot_fewshot(report, args.figures / f"quality_fewshot{suffix}.png"))
    if args.work is None:
        shutil.rmtree(work, ignore_errors=True)

    parts = [] if positions is None or last is None else [
             f"positions top-1 same-volume VoCo {last['same_volume']['top1']:.2f} / random "
             f"{positions['random_init_mean']['same_volume']['top1']:.2f} / raw cosine "
             f"{positions['raw_cosine']['same_volume']['top1']:.2f}, cross-volume VoCo "
             f"{last['cross_volume']['top1']:.2f} / random "
             f"{positions['random_init_mean']['cross_volume']['top1']:.2f} / raw cosine "
             f"{positions['raw_cosine']['cross_volume']['top1']:.2f} (prior "
             f"{positions['prior']['top1']:.2f}, chance {positions['chance_top1']:.2f})"]
    for shots, s in summary.items():
        parts.append(f"{shots}-shot Dice scratch {s['scratch']['mean']:.3f}±"
                     f"{s['scratch']['std']:.3f} vs VoCo {s['voco']['mean']:.3f}±"
                     f"{s['voco']['std']:.3f}")
    print(f"quality_bench ({args.preset}, {args.device}, {timings['total'] / 60:.1f} min): "
          + "; ".join(parts) + f" -> {out}")


if __name__ == "__main__":
    main()
