"""The quality benchmark's ``plateau`` section: a thin caller of ``voco compare``
(its settings, the sections a resumed file goes on with, its tables and figures)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import quality_bench
from quality.plateau import plateau_settings
from quality.report import markdown, write_figures
from voco_core.evaluation.compare import summarise


def test_plateau_settings_take_the_preset_recipe_and_the_finetuning_levers():
    args = quality_bench.parse_args(["--plateau-seeds", "3", "--encoder-lr-scale", "0.5",
                                     "--finetune-set", "train.lr=1e-3"])
    assert args.sections == list(quality_bench.DEFAULT_SECTIONS)
    assert "full" not in args.sections  # the recorded 80-step protocol: on request only
    settings = plateau_settings(args)
    assert (settings.folds, settings.seeds, settings.steps, settings.val_every) == (2, 3, 300, 30)
    assert settings.preset == "tiny" and settings.jobs == args.jobs
    # the preset's recipe (no old-recipe base), plus the levers given
    assert settings.overrides == {"run": {"device": "cpu"},
                                  "train": {"encoder_lr_scale": 0.5, "lr": 1e-3}}
    assert "samples_per_volume" not in settings.overrides["train"]


def test_a_resumed_results_file_goes_on_with_its_own_sections(tmp_path, capsys):
    old = tmp_path / "old.json"
    old.write_text(json.dumps({"settings": {"sections": ["probe", "full", "positions"]}}))
    args = quality_bench.parse_args(["--resume-results", str(old)])
    assert args.sections == ["probe", "full", "positions"]
    assert quality_bench.parse_args(["--resume-results", str(old), "--sections",
                                     "plateau"]).sections == ["plateau"]
    try:
        quality_bench.parse_args(["--sections", "plateau", "--plateau-folds", "5"])
    except SystemExit as stop:
        assert stop.code == 2
    assert "--plateau-folds 5: expected 2 to --plateau-cases (4)" in capsys.readouterr().err


def curve(*dice: float, small: float = 0.0) -> list[dict]:
    return [{"step": 10 * (i + 1), "mean": d, "classes": {"liver": d, "spleen": small}}
            for i, d in enumerate(dice)]


def test_plateau_tables_and_figures_from_a_compare_record(tmp_path):
    runs = {}
    for fold in range(2):
        for arm, lift in (("scratch", 0.0), ("voco", 0.02 + 0.01 * fold)):
            rising = [0.2, 0.4, 0.5, 0.6, 0.6, 0.6]
            runs[f"fold{fold}-seed0-{arm}"] = {
                "fold": fold, "seed": 0, "arm": arm,
                "curve": curve(*[d + lift for d in rising], small=0.1 + lift)}
    record = {"folds": 2, "seeds": 1, "total_steps": 60, "val_every": 10, "runs": runs,
              "headline": "VoCo - scratch at the plateau: +0.025 Dice"}
    record.update(summarise(record))
    text = markdown({"status": "finished", "runs": {}, "summary": {}, "plateau": record})
    assert "**Full finetuning at the plateau** (`voco compare`: 2 folds x 1 seeds = 2 pairs" \
        in text
    # flattened by the rule: the last 3 validations against the 3 before
    assert "| scratch | 0.600 ± 0.000 | no (mean change +0.233) | liver |" in text  # spleen: flat
    assert "| voco | 0.625 ± 0.007 |" in text
    assert "| **spleen** | 0.100 | 0.125 | +0.025 [" in text
    assert "steps saved by VoCo" in text
    assert "- Target NOT met: full finetuning at the plateau" in text  # 2 pairs: wide t CI
    made = write_figures({"runs": {}, "summary": {}, "plateau": record}, tmp_path, "r")
    assert [p.name for p in made] == ["r_plateau_curves.png", "r_plateau_classes.png"]
    assert all(p.stat().st_size > 1000 for p in made)
