"""The quality benchmark's bookkeeping for levers: which control runs may be copied
from another results file, and the VoCo-vs-VoCo comparison of two files."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

from quality.report import treated_versus
from quality.runs import ResultStore, control_fingerprint, copy_controls


def fingerprint(spacing=None, lr_scale=1.0, loss="v1", in_channels=0, n_pretrain=16,
                n_pool=6) -> dict:
    data = {"spacing": spacing}
    if in_channels is not None:
        data["in_channels"] = in_channels
    mode = {"data": data, "train": {"encoder_lr_scale": lr_scale, "lr": 1e-3}}
    return {"pretrain": {"loss": {"variant": loss}}, "pretrain_seed": 0,
            "finetune": {"probe": json.loads(json.dumps(mode)), "full": mode},
            "populations": {"seeds": {"pretrain": 1001, "pool": 3003},
                            "n_pretrain": n_pretrain, "n_pool": n_pool}}


def row(*dice: float) -> dict:
    return {"curve": [{"step": 20 * (i + 1), "mean_dice": d, "class_dice": {}}
                      for i, d in enumerate(dice)]}


def test_control_runs_ignore_the_pretraining_encoder_levers_and_old_schema():
    base = control_fingerprint(fingerprint())
    assert control_fingerprint(fingerprint(loss="v2")) == base  # pretraining lever
    assert control_fingerprint(fingerprint(lr_scale=0.1)) == base  # encoder lever
    assert control_fingerprint(fingerprint(in_channels=None)) == base  # older file
    assert control_fingerprint(fingerprint(n_pretrain=32)) == base  # pretraining data
    assert control_fingerprint(fingerprint(n_pool=8)) != base
    assert control_fingerprint(fingerprint(spacing=[2.6, 2.6, 4.5])) != base
    assert control_fingerprint(fingerprint(in_channels=2)) != base


def test_copy_controls_copies_only_matching_controls(tmp_path):
    old = tmp_path / "old.json"
    old.write_text(json.dumps({"fingerprint": fingerprint(), "runs": {
        "full/2shot/seed0/scratch": row(0.2), "full/2shot/seed0/voco": row(0.3),
        "full/2shot/seed5/scratch": row(0.1)}}))
    store = ResultStore(tmp_path / "new.json", {"fingerprint": fingerprint(loss="v2"),
                                                "runs": {}}, resume=False)
    copied = copy_controls(store, old, {"full": "scratch"}, {"full/2shot/seed0/scratch",
                                                             "full/2shot/seed0/voco"})
    assert copied == 1 and list(store.report["runs"]) == ["full/2shot/seed0/scratch"]
    assert store.report["runs"]["full/2shot/seed0/scratch"]["copied_from"] == str(old)

    other = ResultStore(tmp_path / "other.json", {
        "fingerprint": fingerprint(spacing=[2.6, 2.6, 4.5]), "runs": {}}, resume=False)
    with pytest.raises(SystemExit, match=r"differ: finetune.full.data.spacing, "
                                         r"finetune.probe.data.spacing"):
        copy_controls(other, old, {"full": "scratch"}, {"full/2shot/seed0/scratch"})


def test_treated_versus_pairs_voco_runs_of_two_files_by_seed():
    here = {"runs": {"full/2shot/seed0/voco": row(0.30, 0.40),
                     "full/2shot/seed1/voco": row(0.20, 0.50),
                     "full/2shot/seed2/voco": row(0.90, 0.90)}}  # no partner: left out
    there = {"runs": {"full/2shot/seed0/voco": row(0.25, 0.35),
                      "full/2shot/seed1/voco": row(0.10, 0.45),
                      "full/2shot/seed0/scratch": row(0.0, 0.0)}}
    lines = treated_versus(here, there, "default.json")
    text = "\n".join(lines)
    assert "VoCo here - VoCo of default.json** (2 paired seeds)" in text
    assert "| 20 | 0.250 | 0.175 | +0.075 " in text and ", 2/2 |" in text
    assert "| 40 | 0.450 | 0.400 | +0.050 " in text


def test_pretrained_step_picks_a_kept_student_or_says_which_exist():
    from quality.runs import pretrained_checkpoint

    pretraining = {"checkpoint": "run/checkpoints/last.pt",
                   "kept": {"50": "kept/step_00050.pt", "100": "kept/step_00100.pt"}}
    assert pretrained_checkpoint(pretraining, None) == "run/checkpoints/last.pt"
    assert pretrained_checkpoint(pretraining, 50) == "kept/step_00050.pt"
    with pytest.raises(SystemExit, match=r"--pretrained-step 60: .*kept: 50, 100\)"):
        pretrained_checkpoint(pretraining, 60)


def test_merge_adds_the_runs_of_split_processes_and_refuses_other_settings(tmp_path, capsys):
    import quality_bench

    def results(name, runs, status="finished", **settings):
        path = tmp_path / name
        path.write_text(json.dumps({"fingerprint": fingerprint(**settings), "status": status,
                                    "command": f"run {name}", "runs": runs,
                                    "timings_s": {"probe": 1.0}}))
        return path

    seeds_0_1 = results("a.json", {"probe/2shot/seed0/random": row(0.1, 0.2),
                                   "probe/2shot/seed0/voco": row(0.2, 0.3),
                                   "probe/2shot/seed1/random": row(0.1, 0.1)})
    seeds_1_2 = results("b.json", {"probe/2shot/seed1/random": row(0.9, 0.9),  # a's kept
                                   "probe/2shot/seed1/voco": row(0.2, 0.2),
                                   "probe/2shot/seed2/random": row(0.1, 0.2),
                                   "probe/2shot/seed2/voco": row(0.2, 0.4)}, status="running")
    out = tmp_path / "all.json"
    quality_bench.main(["--merge", str(seeds_0_1), str(seeds_1_2), "--out", str(out)])
    merged = json.loads(out.read_text())
    assert len(merged["runs"]) == 6 and merged["status"] == "partial"  # b was not finished
    assert merged["runs"]["probe/2shot/seed1/random"] == row(0.1, 0.1)
    assert merged["merged_from"] == [{"file": "b.json", "command": "run b.json",
                                      "started_at": None, "runs": [
                                          "probe/2shot/seed1/voco", "probe/2shot/seed2/random",
                                          "probe/2shot/seed2/voco"]}]
    assert merged["timings_s"] == {"probe": 1.0, "b:probe": 1.0}
    summary = merged["summary"]["probe/2shot"]
    assert summary["seeds"] == [0, 1, 2]  # seed 1 paired across the two files
    assert summary["per_step"]["40"]["difference"]["diffs"] == pytest.approx([0.1, 0.1, 0.2])
    assert "6 runs from 2 files, status partial" in capsys.readouterr().out

    other = results("c.json", {}, loss="v2")
    with pytest.raises(SystemExit, match=r"--merge .*c.json was written with other settings "
                                         r".*differ: pretrain.loss.variant"):
        quality_bench.main(["--merge", str(seeds_0_1), str(other), "--out", str(out)])


def test_jobs_run_inline_in_order_or_over_workers_as_they_end():
    import math
    import time

    from quality.jobs import Inline, Jobs, default_jobs

    calls = []
    with Jobs(1, threads=1) as jobs:
        handles = [jobs.submit(calls.append, i) for i in range(3)]
        assert isinstance(handles[0], Inline) and calls == []  # nothing runs at submit
        assert [h.result() or calls[-1] for h in jobs.finished(handles)] == [0, 1, 2]
        handles[0].result()
        assert calls == [0, 1, 2]  # once each

    started = time.perf_counter()
    with pytest.raises(ValueError, match="math domain"), Jobs(2, threads=1) as jobs:
        slow, fast = jobs.submit(time.sleep, 1.5), jobs.submit(math.sqrt, 4.0)
        assert list(jobs.finished([slow, fast])) == [fast, slow]  # spawned workers
        assert fast.result() == 2.0
        jobs.submit(time.sleep, 60.0)
        jobs.submit(math.sqrt, -1.0).result()  # the error reaches the caller...
    assert time.perf_counter() - started < 50  # ...and the run in flight is stopped
    assert default_jobs("cuda:0") == 1 and default_jobs("cpu") in (1, 2)
