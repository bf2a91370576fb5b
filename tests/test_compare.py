"""voco compare: the paired K-fold evaluation on the user's labelled cases, and Dice
against labelled cases, end to end with tiny settings (a few steps), its readings, its
refusals and its resume."""

from __future__ import annotations

import importlib
import json
import math

import pytest

from voco_core.cli import main
from voco_core.data.datalists import load_datalist
from voco_core.errors import VoCoConfigError, VoCoDataError
from voco_core.evaluation.compare import (
    CompareSettings,
    compare,
    k_folds,
    labelled_splits,
    plateau,
    steps_to_reach,
    summarise,
)

from conftest import TEST_SWIN_SETS, one_line_error

TINY = ["--preset", "tiny", "--device", "cpu", "--steps", "1", "--val-every", "1",
        "--set", "train.samples_per_volume=1", "--set", "train.warmup_steps=1",
        "--set", "train.sw_batch_size=1", "--set", "run.tensorboard=false",
        "--set", "data.spacing=null",  # the small test phantoms at their own grid
        *TEST_SWIN_SETS]


def test_k_folds_hold_every_case_out_once(train_dataset):
    cases = load_datalist(train_dataset, section="training", require_labels=True)
    folds = k_folds(cases, 3)
    assert sorted(c.image_file.name for _, held in folds for c in held) == sorted(
        c.image_file.name for c in cases)
    for training, held in folds:
        assert len(held) == 1 and not set(map(id, training)) & set(map(id, held))
    with pytest.raises(VoCoDataError, match="at least 2 labelled cases"):
        k_folds(cases[:1], 2)


def test_readings_from_known_curves():
    def curve(values):
        return [{"step": 10 * (i + 1), "mean": v, "classes": {"liver": v, "spleen": v / 2}}
                for i, v in enumerate(values)]

    scratch = curve([0.1, 0.3, 0.5, 0.6, 0.6, 0.6, 0.6, 0.6, 0.6])
    voco = curve([0.3, 0.5, 0.6, 0.7, 0.7, 0.7, 0.7, 0.7, 0.7])
    assert plateau(scratch) == pytest.approx(0.6) and plateau(voco, "spleen") == pytest.approx(0.35)
    assert steps_to_reach(scratch, 0.54) == 40 and steps_to_reach(voco, 0.54) == 30
    record = {"folds": 1, "seeds": 2, "runs": {
        f"fold0-seed{s}-{arm}": {"fold": 0, "seed": s, "arm": arm, "curve": c}
        for s in range(2) for arm, c in (("scratch", scratch), ("voco", voco))}}
    summary = summarise(record)
    assert summary["final_quality"]["difference"]["mean"] == pytest.approx(0.1)
    assert summary["final_quality"]["per_class"]["spleen"]["difference"]["mean"] == (
        pytest.approx(0.05))
    assert summary["efficiency"]["steps"] == {"scratch": [40, 40], "voco": [30, 30]}
    assert summary["efficiency"]["steps_saved_by_voco"]["mean"] == 10
    assert summary["flattened"]["scratch"]["flat"]
    rising = summarise({**record, "runs": {k: {**r, "curve": curve([0.1, 0.2, 0.3, 0.4, 0.5,
                                                                    0.6, 0.7])}
                                           for k, r in record["runs"].items()}})
    assert not rising["flattened"]["voco"]["flat"]


def test_voco_compare_end_to_end_and_resume(train_dataset, pretrain_run, tmp_path, capsys,
                                            monkeypatch):
    out = tmp_path / "cmp"
    command = ["compare", "--data", str(train_dataset), "--pretrained", str(pretrain_run),
               "--out", str(out), "--folds", "2", *TINY]
    compare_module = importlib.import_module("voco_core.evaluation.compare")
    real_run, started = compare_module._run_arm, []

    def interrupted_at_the_third_run(run_dir, *args, **kwargs):
        started.append(run_dir.name)
        if len(started) == 3:
            raise KeyboardInterrupt
        return real_run(run_dir, *args, **kwargs)

    monkeypatch.setattr(compare_module, "_run_arm", interrupted_at_the_third_run)
    assert main(command) == 130  # Ctrl-C during the third run
    monkeypatch.undo()
    first_two = {name: (out / "runs" / name / "checkpoints" / "last.pt").stat().st_mtime_ns
                 for name in started[:2]}
    capsys.readouterr()

    # Resumes, two runs at once in their own processes: the finished runs are read
    # back, not rerun; the interrupted third and the fourth run side by side.
    assert main([*command, "--jobs", "2"]) == 0
    printed = capsys.readouterr().out
    for name, stamp in first_two.items():
        assert (out / "runs" / name / "checkpoints" / "last.pt").stat().st_mtime_ns == stamp
        assert f"{name}: finetuning" not in printed
    assert "2 of 4 runs finished before: read back" in printed
    assert "2 runs, 2 at a time" in printed and "fold1-seed0-voco: queued, finetuning" in printed
    assert "fold1-seed0-voco: finished, plateau Dice " in printed  # as each run ends
    headline = printed.strip().splitlines()[-1]
    assert headline.startswith("VoCo - scratch at the plateau: ") and "over 2 folds (1 seed)" in (
        headline)
    record = json.loads((out / "compare.json").read_text())
    assert sorted(record["runs"]) == ["fold0-seed0-scratch", "fold0-seed0-voco",
                                      "fold1-seed0-scratch", "fold1-seed0-voco"]
    assert record["final_quality"]["difference"]["n"] == 2
    assert all(len(r["curve"]) == 1 for r in record["runs"].values())
    declared = json.loads((train_dataset / "dataset.json").read_text())["labels"]
    assert set(record["runs"]["fold0-seed0-voco"]["curve"][0]["classes"]) <= {
        name for value, name in declared.items() if value != "0"}  # the dataset's names
    mean = record["final_quality"]["difference"]["mean"]
    assert math.isfinite(mean) and f"{mean:+.3f}" in headline
    assert (out / "curves.png").stat().st_size > 0 and (out / "classes.png").stat().st_size > 0
    # each held-out case was held out once, and the runs validated on it
    assert sorted(name for held in record["held_out"] for name in held) == sorted(
        p.name for p in (train_dataset / "imagesTr").iterdir())


def test_compare_refuses_too_few_cases_in_one_line(pretrain_run, train_dataset, tmp_path,
                                                   capsys):
    one = tmp_path / "one.json"
    entries = json.loads((train_dataset / "dataset.json").read_text())["training"][:1]
    one.write_text(json.dumps({"training": [
        {k: str(train_dataset / v) for k, v in e.items()} for e in entries]}))
    assert main(["compare", "--data", str(one), "--pretrained", str(pretrain_run), "--out",
                 str(tmp_path / "cmp"), *TINY]) == 1
    one_line_error(capsys, "at least 2 labelled cases", "found 1")
    assert not (tmp_path / "cmp").exists()
    assert main(["compare", "--data", str(train_dataset), "--pretrained",
                 str(tmp_path / "missing"), "--out", str(tmp_path / "cmp"), *TINY]) == 1
    one_line_error(capsys, "pretrained checkpoint or run folder not found")
    with pytest.raises(VoCoDataError):
        compare(train_dataset, tmp_path / "missing", tmp_path / "cmp", CompareSettings())


def test_labelled_splits_hold_the_same_cases_out_and_nest(train_dataset):
    cases = load_datalist(train_dataset, section="training", require_labels=True)
    (one, held1), (two, held2) = labelled_splits(cases, (1, 2), held_out=1)
    assert held1 == held2 == [cases[-1]]
    assert one == cases[:1] and two == cases[:2]  # the larger set holds the smaller
    with pytest.raises(VoCoDataError, match="needs 4 labelled cases, found 3"):
        labelled_splits(cases, (1, 2), held_out=2)
    with pytest.raises(VoCoConfigError, match="--held-out 0"):
        labelled_splits(cases, (1,), held_out=0)


def test_compare_by_labelled_cases_end_to_end(train_dataset, pretrain_run, tmp_path, capsys):
    out = tmp_path / "cmp"
    assert main(["compare", "--data", str(train_dataset), "--pretrained", str(pretrain_run),
                 "--out", str(out), "--labelled", "1,2", "--held-out", "1", *TINY]) == 0
    headline = capsys.readouterr().out.strip().splitlines()[-1]
    record = json.loads((out / "compare.json").read_text())
    assert record["design"] == "labelled" and record["labelled"] == [1, 2]
    assert sorted(record["runs"]) == sorted(f"labelled{n}-seed0-{arm}" for n in (1, 2)
                                            for arm in ("scratch", "voco"))
    held = {name for split in record["held_out"] for name in split}
    assert held == {"phantom_002.nii.gz"}  # the same case, for every run
    for n in ("1", "2"):
        difference = record["by_labelled"][n]["final_quality"]["difference"]
        assert difference["n"] == 1 and f"{n} labelled {difference['mean']:+.3f} Dice" in (
            headline)
    assert headline.startswith("VoCo - scratch at the plateau: ") and "1 held out" in headline
    assert (out / "labelled.png").stat().st_size > 0 and (out / "curves.png").stat().st_size > 0
    assert main(["compare", "--data", str(train_dataset), "--pretrained", str(pretrain_run),
                 "--out", str(tmp_path / "both"), "--labelled", "1", "--folds", "2",
                 *TINY]) == 1
    one_line_error(capsys, "--folds and --labelled are two designs")
    assert main(["compare", "--data", str(train_dataset), "--pretrained", str(pretrain_run),
                 "--out", str(tmp_path / "many"), "--labelled", "1,4", *TINY]) == 1
    one_line_error(capsys, "--labelled 4 with --held-out 2 needs 6 labelled cases, found 3")
    assert main(["compare", "--data", str(train_dataset), "--pretrained", str(pretrain_run),
                 "--out", str(tmp_path / "folds"), "--held-out", "1", *TINY]) == 1
    one_line_error(capsys, "--held-out 1 goes with --labelled")
    assert not (tmp_path / "folds").exists()


def test_ctrl_c_stops_parallel_runs_after_their_step_and_starts_no_other(
        train_dataset, pretrain_run, tmp_path):
    """A terminal's Ctrl-C reaches the whole process group, workers included: the
    parent decides; the running finetunings stop with a checkpoint, queued ones never
    start, and the command says how to go on (exit 130)."""
    import os
    import signal
    import subprocess
    import sys
    import time

    out = tmp_path / "cmp"
    command = [sys.executable, "-m", "voco_core", "compare", "--data", str(train_dataset),
               "--pretrained", str(pretrain_run), "--out", str(out), "--folds", "3",
               "--jobs", "2", *TINY, "--steps", "200", "--val-every", "100"]
    child = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True, start_new_session=True)
    try:
        deadline = time.monotonic() + 180
        while not any('"step"' in log.read_text() for log in out.glob("runs/*/log.jsonl")):
            assert child.poll() is None and time.monotonic() < deadline, child.stderr.read()
            time.sleep(0.2)
        os.killpg(child.pid, signal.SIGINT)  # what Ctrl-C in a terminal does
        stdout, stderr = child.communicate(timeout=120)
    finally:
        if child.poll() is None:
            os.killpg(child.pid, signal.SIGKILL)
    assert child.returncode == 130, stderr
    assert "SIGINT: stopping after the current step" in stderr and "Traceback" not in stderr
    assert "stopped: 0 of 6 runs finished; the same command resumes" in stdout
    started = sorted(p.name for p in (out / "runs").iterdir())
    assert started == ["fold0-seed0-scratch", "fold0-seed0-voco"]  # the 4 queued: never
    for name in started:
        steps = [json.loads(line)["step"] for line in
                 (out / "runs" / name / "log.jsonl").read_text().splitlines()]
        assert (out / "runs" / name / "checkpoints" / "last.pt").is_file()
        assert 1 <= max(steps) < 200


def test_seeds_split_over_two_folders_are_read_back_together(train_dataset, pretrain_run,
                                                              tmp_path, capsys):
    """``--first-seed``: seed 1 runs elsewhere (another machine), its run folders are
    copied in, and the whole range reads both parts back without rerunning either."""
    import shutil

    design = ["--data", str(train_dataset), "--pretrained", str(pretrain_run), "--labelled",
              "1", "--held-out", "1", *TINY]
    assert main(["compare", *design, "--out", str(tmp_path / "part1"), "--first-seed",
                 "1"]) == 0
    part1 = json.loads((tmp_path / "part1" / "compare.json").read_text())
    assert sorted(part1["runs"]) == ["labelled1-seed1-scratch", "labelled1-seed1-voco"]
    assert part1["first_seed"] == 1 and len(part1["pretrained_sha256"]) == 16
    assert main(["compare", *design, "--out", str(tmp_path / "all")]) == 0  # seed 0
    for run in (tmp_path / "part1" / "runs").iterdir():
        shutil.copytree(run, tmp_path / "all" / "runs" / run.name)
    capsys.readouterr()
    assert main(["compare", *design, "--out", str(tmp_path / "all"), "--seeds", "2"]) == 0
    printed = capsys.readouterr().out
    assert "4 of 4 runs finished before: read back" in printed and "finetuning on" not in printed
    whole = json.loads((tmp_path / "all" / "compare.json").read_text())
    assert whole["by_labelled"]["1"]["final_quality"]["difference"]["n"] == 2
    assert whole["runs"]["labelled1-seed1-voco"] == part1["runs"]["labelled1-seed1-voco"]
    assert "first_seed" not in whole  # 0: the records of older comparisons stay as they were
    with pytest.raises(SystemExit):  # argparse's usage line, as for every bad number
        main(["compare", *design, "--out", str(tmp_path / "neg"), "--first-seed", "-1"])
    assert "--first-seed: expected a number >= 0, got -1" in capsys.readouterr().err


def test_a_comparison_refuses_a_backbone_that_changed_under_it(train_dataset, pretrain_run,
                                                               tmp_path, capsys):
    """A run folder's last.pt moves on while its pretraining continues: VoCo arms of
    two backbones are no pairs, so resuming with another checkpoint is refused."""
    out = tmp_path / "cmp"
    out.mkdir()
    (out / "compare.json").write_text(json.dumps({"pretrained_sha256": "0123456789abcdef"}))
    assert main(["compare", "--data", str(train_dataset), "--pretrained", str(pretrain_run),
                 "--out", str(out), "--labelled", "1", "--held-out", "1", *TINY]) == 1
    one_line_error(capsys, "began with another backbone (sha256 0123456789abcdef, now ",
                   "new --out")
    assert not (out / "runs").exists()


def test_scratch_arms_run_before_the_backbone_exists_and_are_read_back(
        train_dataset, pretrain_run, tmp_path, capsys):
    """The scratch arms need no backbone: they can run while the pretraining does (the
    quality benchmark runs them beside it); compare then runs only the VoCo arms."""
    from voco_core.cli import _flag_overrides, build_parser
    from voco_core.evaluation.compare import run_scratch_arm, scratch_arms

    args = build_parser().parse_args(["compare", "--data", str(train_dataset), "--pretrained",
                                      str(pretrain_run), "--out", str(tmp_path), *TINY])
    settings = CompareSettings(folds=2, steps=1, val_every=1, preset="tiny",
                               overrides=_flag_overrides(args, "train"))
    out = tmp_path / "cmp"
    arms = scratch_arms(train_dataset, out, settings)
    assert [run.key for run, _ in arms] == ["fold0-seed0-scratch", "fold1-seed0-scratch"]
    assert all(run.pretrained is None for run, _ in arms)
    assert run_scratch_arm(*arms[0]) == "fold0-seed0-scratch"
    assert [run.key for run, _ in scratch_arms(train_dataset, out, settings)] == [
        "fold1-seed0-scratch"]  # a finished one is not planned again
    run_scratch_arm(*arms[1])
    capsys.readouterr()
    record = compare(train_dataset, pretrain_run, out, settings)
    printed = capsys.readouterr().out
    assert "2 of 4 runs finished before: read back" in printed
    assert "scratch: finetuning" not in printed and "fold1-seed0-voco: finetuning" in printed
    assert record["status"] == "finished" and record["final_quality"]["difference"]["n"] == 2
