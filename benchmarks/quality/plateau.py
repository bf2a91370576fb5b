"""Section ``plateau``: full finetuning read where the curves have flattened.

A thin caller of ``voco compare`` (:mod:`voco_core.evaluation.compare`): the
evaluation's pretraining run against scratch on a labelled population of the *varied*
phantom style (each subject a different examination: field of view, body size,
organ shapes, contrast phase, noise, slice thickness), K folds over its cases, paired
seeds, the finetuning preset's own recipe (``tiny``: 4 mm grid, class-balanced CE,
batch Dice, lr 2e-3) shortened to ``--plateau-steps``. Both readings come from
``compare``: the final quality (Dice at the plateau, VoCo - scratch with 95% t and
bootstrap intervals, per class) and the efficiency (steps to 90% of scratch's
plateau), with whether each arm's curves have flattened, per class.

The comparison's run folders live in ``WORK/plateau_<results name>/`` and resume by
themselves (``--resume-results`` re-enters the same folder). With ``--jobs`` > 1 the
scratch arms, which need no backbone, run beside the pretraining
(:func:`plateau_scratch_jobs`); the section then reads them back and runs the VoCo arms.
"""

from __future__ import annotations

from pathlib import Path

from .settings import dotted


def plateau_settings(args):
    """The :class:`~voco_core.evaluation.compare.CompareSettings` of this evaluation."""
    from voco_core.config import merge
    from voco_core.evaluation.compare import CompareSettings

    encoder = {key: getattr(args, key) for key in ("encoder_lr_scale", "freeze_encoder_steps")
               if getattr(args, key) is not None}
    overrides = merge({"run": {"device": args.device}, "train": encoder},
                      dotted(args.finetune_set, "--finetune-set"))
    return CompareSettings(folds=args.plateau_folds, seeds=args.plateau_seeds,
                           jobs=args.jobs, steps=args.plateau_steps,
                           val_every=args.plateau_every, preset=args.preset,
                           overrides=overrides)


def plateau_recipe(args) -> dict:
    """What the results file's fingerprint holds of this section (resume guard)."""
    settings = plateau_settings(args)
    return {"folds": settings.folds, "seeds": settings.seeds, "steps": settings.steps,
            "val_every": settings.val_every, "preset": settings.preset,
            "overrides": settings.overrides}


def plateau_scratch_jobs(jobs, args, data: Path, out: Path) -> list:
    """Submit the section's unfinished scratch arms to the evaluation's worker
    processes (:class:`quality.jobs.Jobs`); each handle's result is the run's key."""
    from voco_core.evaluation.compare import run_scratch_arm, scratch_arms

    return [jobs.submit(run_scratch_arm, run, settings)
            for run, settings in scratch_arms(data / "dataset.json", out, plateau_settings(args))]


def plateau_section(args, data: Path, pretrained: str, out: Path) -> dict:
    """Run (or resume) the comparison into ``out``; returns ``compare.json``'s record
    with its one-line ``headline``."""
    from voco_core.evaluation.compare import compare, headline

    from .runs import log

    record = compare(data / "dataset.json", pretrained, out, plateau_settings(args), say=log)
    record["headline"] = headline(record)
    log(f"plateau: {record['headline']}")
    return record
