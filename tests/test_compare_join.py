"""benchmarks/compare_join.py: the records of a comparison run in parts (``voco compare
--first-seed``) joined, both readings read again over every pair."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import compare_join
from voco_core.evaluation.compare import summarise


def _curve(values):
    return [{"step": 10 * (i + 1), "mean": v, "classes": {"liver": v, "spleen": v / 2}}
            for i, v in enumerate(values)]


def _part(seeds, lift, digest="0123456789abcdef"):
    """A finished K=1-fold record whose VoCo arm sits ``lift`` above scratch."""
    runs = {}
    for seed in seeds:
        base = [0.1, 0.3, 0.5, 0.6, 0.6, 0.6, 0.6]
        runs[f"fold0-seed{seed}-scratch"] = {"fold": 0, "seed": seed, "arm": "scratch",
                                             "curve": _curve(base)}
        runs[f"fold0-seed{seed}-voco"] = {"fold": 0, "seed": seed, "arm": "voco",
                                          "curve": _curve([v + lift * (seed + 1)
                                                           for v in base])}
    return {"data": "lab", "preset": "tiny", "design": "folds", "folds": 1,
            "total_steps": 70, "val_every": 10, "overrides": {}, "held_out": [["a.nii.gz"]],
            "pretrained": "pre_run", "pretrained_sha256": digest, "seeds": len(seeds),
            "status": "finished", "runs": runs}


def test_parts_join_into_the_reading_of_every_pair(tmp_path, capsys):
    first, second = _part([0, 1], 0.01), _part([2], 0.01)
    joined = compare_join.join([first, second], ["a", "b"])
    assert joined["seeds"] == 3 and joined["seed_values"] == [0, 1, 2]
    everything = {"runs": {**first["runs"], **second["runs"]}}
    assert joined["final_quality"] == summarise(everything)["final_quality"]
    assert joined["final_quality"]["difference"]["n"] == 3
    assert joined["final_quality"]["difference"]["mean"] == pytest.approx(0.02)
    assert [p["seeds"] for p in joined["parts"]] == [[0, 1], [2]]
    paths = []
    for name, record in (("a", first), ("b", second)):
        paths.append(tmp_path / f"{name}.json")
        paths[-1].write_text(json.dumps(record))
    assert compare_join.main([*map(str, paths), "--out", str(tmp_path / "joined.json"),
                              "--figures", str(tmp_path / "fig")]) == 0
    printed = capsys.readouterr().out.strip().splitlines()
    assert printed[0].startswith("6 runs from 2 parts") and printed[-1].startswith(
        "VoCo - scratch at the plateau: +0.020 Dice [")
    assert (tmp_path / "fig_curves.png").stat().st_size > 0
    assert (tmp_path / "fig_classes.png").stat().st_size > 0
    written = (tmp_path / "joined.json").read_text()
    again = [*map(str, paths), "--out", str(tmp_path / "joined.json")]
    assert compare_join.main(again) == 1  # a file already there is not replaced
    err = capsys.readouterr().err
    assert err.startswith("compare_join: error: ") and "joined.json" in err
    assert "--overwrite" in err and (tmp_path / "joined.json").read_text() == written
    assert compare_join.main([*again, "--overwrite"]) == 0


def test_what_is_not_one_comparison_is_refused(tmp_path, capsys):
    with pytest.raises(ValueError, match="judged different backbones"):
        compare_join.join([_part([0], 0.01), _part([1], 0.01, "fedcba9876543210")], ["a", "b"])
    with pytest.raises(ValueError, match="b: total_steps differ"):
        compare_join.join([_part([0], 0.01), {**_part([1], 0.01), "total_steps": 80}],
                          ["a", "b"])
    with pytest.raises(ValueError, match="fold0-seed0-scratch, fold0-seed0-voco are in another"):
        compare_join.join([_part([0], 0.01), _part([0], 0.01)], ["a", "b"])
    half = _part([1], 0.01)
    del half["runs"]["fold0-seed1-voco"]
    with pytest.raises(ValueError, match=r"b: \(fold, seed\) \[\(0, 1\)\] lack an arm"):
        compare_join.join([_part([0], 0.01), half], ["a", "b"])
    older = {k: v for k, v in _part([1], 0.01).items()  # a results file: no digest, no status
             if k not in ("pretrained_sha256", "status")}
    joined = compare_join.join([_part([0], 0.01), older], ["a", "b"])
    assert joined["parts"][1]["pretrained_sha256"] == "not recorded"
    assert compare_join.main([str(tmp_path / "missing.json"), "--out",
                              str(tmp_path / "j.json")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("compare_join: error: ") and err.count("\n") == 1
