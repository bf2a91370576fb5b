"""The sparse-label benchmark's protocols: the ``plateau`` one reads each run where its
curve has flattened, with the finetuning preset's recipe (the runs themselves are the
benchmark's, not the suite's); the ``recorded`` one keeps older files as they were."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import sparse_bench
from sparse.report import final_dice, markdown, summarise


def _row(values, class_values=None):
    return {"curve": [{"step": 30 * (i + 1), "mean_dice": v,
                       "class_dice": {"liver": v, "spleen": (class_values or values)[i]}}
                      for i, v in enumerate(values)]}


def _report(protocol, runs):
    settings = {"shots": 2, "steps": 300, "seeds": 2}
    if protocol:
        settings["protocol"] = protocol
    return {"settings": settings, "efforts": [3, "whole"], "axial_slices": 64, "runs": runs}


FLAT = [0.2, 0.4, 0.5, 0.6, 0.6, 0.61, 0.6, 0.62, 0.61]
RISING = [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9]


def test_plateau_protocol_reads_the_mean_of_the_last_validations_and_says_what_is_flat():
    runs = {f"{e}/2shot/seed{s}/{i}": _row(FLAT if i == "scratch" else RISING)
            for e in ("k3", "whole") for s in (0, 1) for i in ("scratch", "voco")}
    report = _report("plateau", runs)
    dice = final_dice(report)
    assert dice["k3", 0, "scratch"] == pytest.approx((0.6 + 0.62 + 0.61) / 3, abs=1e-4)
    assert dice["k3", 0, "voco"] == pytest.approx(0.8)
    report["summary"] = summarise(report)
    assert report["summary"]["reading"] == "plateau"
    assert report["summary"]["flattened"]["k3/scratch"]["flat"]
    assert not report["summary"]["flattened"]["k3/voco"]["flat"]
    text = markdown(report)
    assert "at the plateau (mean of the last 3 validations)" in text
    assert "not yet: k3/voco (mean +0.300, classes liver, spleen)" in text
    assert "k3/scratch" not in text.split("not yet:")[1]
    # a recorded file (no protocol): its last validation, as it was written
    older = _report(None, runs)
    assert final_dice(older)["k3", 0, "scratch"] == pytest.approx(0.61)
    older["summary"] = summarise(older)
    assert "flattened" not in older["summary"] and "at the last step" in markdown(older)


def test_plateau_protocol_takes_the_presets_recipe_and_a_resumed_file_its_own(tmp_path):
    args = sparse_bench.parse_args(["--jobs", "1"])
    assert args.protocol == "plateau" and (args.steps, args.val_every) == (300, 30)
    config = sparse_bench.run_config(args, sparse_bench.quality_args(args), seed=4)
    assert config.train.total_steps == 300 and config.train.val_every == 30
    assert config.data.ignore_label == sparse_bench.IGNORE_LABEL and config.run.seed == 4
    from voco_core.config import make_finetune_config

    tiny = make_finetune_config("tiny")  # the preset's recipe, not the recorded one
    assert (config.train.lr, config.train.ce_balance, config.train.batch_dice,
            config.data.spacing) == (tiny.train.lr, tiny.train.ce_balance,
                                     tiny.train.batch_dice, tiny.data.spacing)
    recorded = tmp_path / "sparse_bench_cpu.json"
    recorded.write_text(json.dumps({"settings": {"steps": 50}}))  # written before protocols
    args = sparse_bench.parse_args(["--resume-results", str(recorded), "--jobs", "1"])
    assert args.protocol == "recorded" and args.steps == 50 and args.val_every == 50
    old = sparse_bench.run_config(args, sparse_bench.quality_args(args), seed=0)
    assert old.train.lr == 1e-3 and old.train.val_every == 50


def test_quick_populations_are_made_from_the_sparse_arguments(tmp_path):
    """The quality benchmark's phantom populations, from sparse_bench's own arguments
    (which name no sections: it once failed there before its first run)."""
    from quality.runs import make_populations

    args = sparse_bench.parse_args(["--quick", "--jobs", "1", "--n-pretrain", "1",
                                    "--n-pool", "2", "--shots", "2"])
    folders = make_populations(sparse_bench.quality_args(args), tmp_path)
    assert sorted(folders) == ["heldout", "pool", "pretrain"]
    assert len(list((folders["pool"] / "labelsTr").iterdir())) == 2
