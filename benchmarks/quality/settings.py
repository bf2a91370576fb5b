"""Per-preset sizes of the evaluation, its levers, and the configs built from them."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import yaml

# Per-preset defaults; every one can be changed from the command line. The budget
# arithmetic behind them is in docs/benchmarks.md ("Quality").
SETTINGS: dict[str, dict[str, Any]] = {
    "tiny": {  # CPU, --jobs 2: 107.7 min end to end on a slow day's VM, ~72 at the speed
        # of the recorded parts (docs/benchmarks.md, "budget");
        # one 64^3 crop per finetuning step: a decoder step on one thread measured 4.3 s
        # with the preset's two crops, which put the finetuning alone at ~3 hours
        "phantom_shape": (96, 96, 64), "n_pretrain": 16, "n_heldout": 4, "n_pool": 6,
        "pretrain_steps": 250, "eval_every": 50, "teacher": "head", "spec_augment": False,
        "sub_volumes": 16, "random_inits": 2, "seeds": 8, "shots": "2",
        "full_steps": 80, "full_curve_every": 20, "probe_steps": 40, "probe_curve_every": 20,
        "finetune_spacing": None, "finetune_samples": 1,
        # plateau: 2 folds x 1 seed of the tiny preset's recipe for 300 steps (28-38 min
        # per run at one thread beside another: 5.1-6.5 s/step, 12 s per validation);
        # 150 steps ended 0.11-0.13 Dice below 300 with flat-looking last validations
        "plateau_cases": 4, "plateau_shape": (160, 160, 96), "plateau_folds": 2,
        "plateau_seeds": 1, "plateau_steps": 300, "plateau_every": 30,
    },
    "base": {  # one H200: about 9 minutes, estimated (see the docs for the arithmetic)
        "phantom_shape": (128, 128, 96), "n_pretrain": 16, "n_heldout": 4, "n_pool": 6,
        "pretrain_steps": 300, "eval_every": 100, "teacher": "head", "spec_augment": True,
        "sub_volumes": 16, "random_inits": 1, "seeds": 8, "shots": "2",
        "full_steps": 80, "full_curve_every": 20, "probe_steps": 40, "probe_curve_every": 20,
        "finetune_spacing": None, "finetune_samples": None,
        "plateau_cases": 4, "plateau_shape": (160, 160, 96), "plateau_folds": 2,
        "plateau_seeds": 4, "plateau_steps": 400, "plateau_every": 40,
    },
}
QUICK: dict[str, Any] = {  # a smoke test of every path: 2 paired seeds, 2-point curves,
    # small phantoms (one 64^3 validation window each) and one crop per finetuning step
    "phantom_shape": (64, 64, 48), "finetune_samples": 1,
    "n_pretrain": 3, "n_heldout": 2, "n_pool": 3, "pretrain_steps": 3, "eval_every": 3,
    "sub_volumes": 2, "random_inits": 1, "seeds": 2, "shots": "2",
    "full_steps": 2, "full_curve_every": 1, "probe_steps": 2, "probe_curve_every": 1,
    "plateau_cases": 2, "plateau_shape": (64, 64, 48), "plateau_seeds": 1,
    "plateau_steps": 2, "plateau_every": 1,
}
POPULATION_SEEDS = {"pretrain": 1001, "heldout": 2002, "pool": 3003, "plateau": 11}
"""``plateau``: the varied subjects of ``voco make-phantoms -n 4 --seed 11 --style
varied`` (the population of the recorded varied-style readings)."""
MODES = ("probe", "full")
"""``probe``: encoder frozen (``train.encoder_lr_scale: 0``), only the decoder trains;
``full``: everything trains. Each compares VoCo with a random-init encoder."""
INITS = {"probe": ("random", "voco"), "full": ("scratch", "voco")}


PHANTOM_BODY_WIDTH_MM = 312.0
"""x extent of a phantom's foreground box (measured: 75 voxels of 4.17 mm, +-3)."""


def aligned_spacing(args) -> tuple[float, float, float]:
    """Default spacing of ``--align-scales``: in-plane, the body spans the pretraining
    sample's x size (2.6 mm for ``tiny``'s 120 voxels: no padding-dominated samples);
    in depth, the phantoms' own 288 mm / shape[2] (4.5 mm at 64 slices)."""
    from voco_core.config import make_pretrain_config

    target_x = make_pretrain_config(args.preset, check_device=False).data.target_size[0]
    in_plane = round(PHANTOM_BODY_WIDTH_MM / target_x, 3)
    return in_plane, in_plane, round(288.0 / args.phantom_shape[2], 3)


def dotted(assignments: list[str] | None, option: str) -> dict:
    """``["train.lr=1e-3", "loss.variant=v2"]`` -> nested overrides (YAML values)."""
    out: dict = {}
    for item in assignments or []:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip() or any(not part for part in key.strip().split(".")):
            raise argparse.ArgumentTypeError(
                f"{option} {item!r}: expected SECTION.KEY=VALUE, e.g. train.lr=1e-3")
        node = out
        *parents, leaf = key.strip().split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = _value(raw)
    return out


def _value(raw: str):
    """A YAML value; ``1e-4`` too (YAML 1.1 reads it as a string)."""
    value = yaml.safe_load(raw)
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return value
    return value


def lever_overrides(args) -> tuple[dict, dict]:
    """(pretraining, finetuning) overrides of the chosen levers, before ``--*-set``."""
    from voco_core.config import merge

    pretrain: dict = {}
    finetune: dict = {}
    if not args.spec_augment:  # intensity shift only: flips/rot90 slow tiny's loss down
        pretrain["augment"] = {"flip_prob": 0.0, "rot90_prob": 0.0}
    if args.pretrain_lr:
        pretrain["optim"] = {"lr": args.pretrain_lr}
    if args.loss_variant:
        pretrain["loss"] = {"variant": args.loss_variant}
    if args.align_scales:
        # Pretraining resamples to the spacing finetuning uses, and tiny's crops are
        # used at native size (resize_crops: False): both see one voxel scale.
        spacing = list(args.align_spacing or aligned_spacing(args))
        pretrain["data"] = {"resample": "spacing", "target_spacing": spacing}
        finetune["data"] = {"spacing": spacing}
    elif args.finetune_spacing:
        finetune["data"] = {"spacing": list(args.finetune_spacing)}
    train: dict = {}
    if args.finetune_samples:
        train["samples_per_volume"] = args.finetune_samples
    if args.encoder_lr_scale is not None:
        train["encoder_lr_scale"] = args.encoder_lr_scale
    if args.freeze_encoder_steps is not None:
        train["freeze_encoder_steps"] = args.freeze_encoder_steps
    if train:
        finetune["train"] = train
    return (merge(pretrain, dotted(args.pretrain_set, "--pretrain-set")),
            merge(finetune, dotted(args.finetune_set, "--finetune-set")))


def pretrain_config(args, steps: int):
    """The VoCo pretraining config of this evaluation (``args.seed`` seeds the run)."""
    from voco_core.config import make_pretrain_config, merge

    base = {
        # The phantoms are CT: the window, stated (not auto), keeps the recorded runs'
        # configs identical to today's and so reusable.
        "data": {"cache": "memory", "intensity": "ct"},
        "model": {"teacher": args.teacher},
        "optim": {"total_steps": steps, "warmup_steps": max(2, steps // 20)},
        "run": {"device": args.device, "seed": args.seed, "tensorboard": False,
                "deterministic": False, "checkpoint_every": args.eval_every,
                "log_every": 1},
    }
    return make_pretrain_config(args.preset, merge(base, lever_overrides(args)[0]))


def phantom_data() -> dict:
    """The ``data`` overrides every finetuning on the phantoms states: their classes,
    named, and CT intensities."""
    from voco_core.data.phantoms import LABEL_NAMES

    return {"num_classes": len(LABEL_NAMES), "intensity": "ct",
            "class_names": [LABEL_NAMES[i] for i in sorted(LABEL_NAMES)]}


def finetune_config(args, mode: str, seed: int):
    """The SwinUNETR finetuning config of one run: ``mode`` probe or full, ``seed``."""
    from voco_core.config import make_finetune_config, merge

    steps = args.probe_steps if mode == "probe" else args.full_steps
    every = args.probe_curve_every if mode == "probe" else args.full_curve_every
    base = {
        "data": {**phantom_data(), "spacing": None},
        # The recipe every recorded result was made with (the tiny preset has changed
        # since: 4 mm grid, lr 2e-3, class-balanced CE, batch Dice, no flips); the new
        # one is a --finetune-set away.
        "train": {"total_steps": steps, "warmup_steps": max(1, steps // 10),
                  "val_every": every, "ce_balance": 0.0, "batch_dice": False,
                  "lr": 1e-3, "flip_prob": 0.1, "rot90_prob": 0.1},
        "run": {"device": args.device, "seed": seed, "tensorboard": False,
                "deterministic": False, "checkpoint_every": steps, "log_every": 10},
    }
    overrides = merge(base, lever_overrides(args)[1])
    if mode == "probe":  # the probe's definition wins over any encoder lever
        overrides = merge(overrides, {"train": {"encoder_lr_scale": 0.0,
                                                "freeze_encoder_steps": 0}})
    return make_finetune_config(args.preset, overrides)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Sizes (defaults from SETTINGS[--preset], then QUICK) and levers."""
    d = argparse.SUPPRESS  # filled from SETTINGS[preset] (and QUICK)
    sizes = parser.add_argument_group("sizes (defaults: the preset's, see SETTINGS)")
    sizes.add_argument("--phantom-shape", type=int, nargs=3, default=d)
    sizes.add_argument("--n-pretrain", type=int, default=d, help="unlabelled phantoms")
    sizes.add_argument("--n-heldout", type=int, default=d, help="held-out phantoms")
    sizes.add_argument("--n-pool", type=int, default=d, help="labelled pool")
    sizes.add_argument("--pretrain-steps", type=int, default=d)
    sizes.add_argument("--eval-every", type=int, default=d,
                       help="keep and score the student every N pretraining steps")
    sizes.add_argument("--teacher", choices=["full", "head", "none"], default=d)
    sizes.add_argument("--sub-volumes", type=int, default=d,
                       help="sub-volumes per held-out volume and position protocol")
    sizes.add_argument("--random-inits", type=int, default=d,
                       help="randomly initialised networks scored on positions")
    sizes.add_argument("--seeds", type=int, default=d, help="paired seeds per setting")
    sizes.add_argument("--first-seed", type=int, default=0)
    sizes.add_argument("--shots", default=d, help="comma list of labelled phantoms, e.g. 2,4")
    sizes.add_argument("--full-steps", type=int, default=d, help="full finetuning steps")
    sizes.add_argument("--full-curve-every", type=int, default=d,
                       help="held-out Dice every N full-finetuning steps (learning curve)")
    sizes.add_argument("--probe-steps", type=int, default=d, help="frozen-encoder probe steps")
    sizes.add_argument("--probe-curve-every", type=int, default=d)

    sizes.add_argument("--plateau-cases", type=int, default=d,
                       help="section plateau: labelled varied phantoms (K folds over them)")
    sizes.add_argument("--plateau-shape", type=int, nargs=3, default=d,
                       help="section plateau: voxels of the varied phantoms")
    sizes.add_argument("--plateau-folds", type=int, default=d)
    sizes.add_argument("--plateau-seeds", type=int, default=d, help="paired seeds per fold")
    sizes.add_argument("--plateau-steps", type=int, default=d,
                       help="section plateau: finetuning steps (the preset's recipe)")
    sizes.add_argument("--plateau-every", type=int, default=d,
                       help="section plateau: held-out Dice every N steps")
    sizes.add_argument("--finetune-samples", type=int, default=d,
                       help="finetuning crops per step (train.samples_per_volume; "
                            "default: the preset's)")

    levers = parser.add_argument_group("levers (each is one invocation)")
    levers.add_argument("--spec-augment", action=argparse.BooleanOptionalAction, default=d,
                        help="the spec's per-crop flips/rot90 in pretraining "
                             "(default: off for tiny, on for base)")
    levers.add_argument("--pretrain-lr", type=float, default=None,
                        help="pretraining lr (default: the preset's)")
    levers.add_argument("--loss-variant", choices=["v1", "v2"], default=None,
                        help="pretraining loss.variant (default: the preset's)")
    levers.add_argument("--align-scales", action="store_true",
                        help="pretrain with data.resample: spacing at the finetuning spacing "
                             "(native-size crops), finetune at that spacing too")
    levers.add_argument("--align-spacing", type=float, nargs=3, default=None,
                        metavar=("X", "Y", "Z"),
                        help="mm for --align-scales (default: the body spans the pretraining "
                             "sample in x: 2.6 x 2.6 x 4.5 for tiny)")
    levers.add_argument("--finetune-spacing", type=float, nargs=3, default=d,
                        metavar=("X", "Y", "Z"),
                        help="finetuning data.spacing (default: the preset's)")
    levers.add_argument("--encoder-lr-scale", type=float, default=None,
                        help="full finetuning train.encoder_lr_scale (the probe always uses 0)")
    levers.add_argument("--freeze-encoder-steps", type=int, default=None,
                        help="full finetuning train.freeze_encoder_steps")
    levers.add_argument("--pretrained-step", type=int, default=None, metavar="N",
                        help="VoCo runs start from the student kept at pretraining step N "
                             "(a multiple of --eval-every) instead of the last: pretraining "
                             "length measured without another pretraining run")
    levers.add_argument("--control-from", type=Path, default=None, metavar="FILE",
                        help="for a lever of the pretrained init only (pretraining recipe, "
                             "encoder lr, decoder warm-up): take the control runs (scratch, "
                             "random) from FILE, a results file with the same populations "
                             "and finetuning settings apart from the encoder levers (control "
                             "runs never load the pretrained checkpoint)")
    levers.add_argument("--pretrain-set", action="append", metavar="SECTION.KEY=VALUE",
                        help="any pretraining config override (repeatable)")
    levers.add_argument("--finetune-set", action="append", metavar="SECTION.KEY=VALUE",
                        help="any finetuning config override (repeatable)")


def fill_defaults(args: argparse.Namespace) -> None:
    """Fill the sizes the command line left out from SETTINGS[preset] (and QUICK)."""
    settings = dict(SETTINGS[args.preset])
    if args.quick:
        settings.update(QUICK)
    for key, value in settings.items():
        if not hasattr(args, key):
            setattr(args, key, value)
    args.phantom_shape = tuple(args.phantom_shape)
    args.plateau_shape = tuple(args.plateau_shape)
