"""The recorded results files resume (``--resume-results``) after the library has
grown fields: a field the file's fingerprint lacks is accepted at its dataclass default
(the behaviour before it existed), any other difference is refused."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import quality_bench
from quality.runs import ResultStore, added_at_default
from quality.settings import pretrain_config

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("name", ["quality_eval_cpu.json", "quality_eval_cpu_jobs2.json"])
def test_recorded_quality_files_resume_with_their_own_sections(name, tmp_path, capsys):
    recorded = tmp_path / name
    shutil.copy(ROOT / "benchmarks" / "results" / name, recorded)
    args = quality_bench.parse_args(["--resume-results", str(recorded)])
    assert "plateau" not in args.sections  # the file's sections, not today's default
    report = {"fingerprint": quality_bench.fingerprint(
        args, pretrain_config(args, args.pretrain_steps))}
    store = ResultStore(recorded, report, resume=True)
    assert len(store.report["runs"]) == 32
    printed = capsys.readouterr()
    assert "at their defaults (the behaviour before them): " in printed.out + printed.err


def test_only_a_field_added_at_its_default_is_accepted():
    old = {"finetune": {"full": {"train": {"lr": 1e-3}}}, "pretrain": {"data": {}}}
    new = {"finetune": {"full": {"train": {"lr": 1e-3, "batch_dice": False,
                                           "ce_balance": 0.5}}},
           "pretrain": {"data": {"in_channels": 0}}}
    assert added_at_default(old, new, "finetune.full.train.batch_dice")
    assert added_at_default(old, new, "pretrain.data.in_channels")
    assert not added_at_default(old, new, "finetune.full.train.ce_balance")  # not 0.0
    changed = {"finetune": {"full": {"train": {"lr": 2e-3}}}}
    assert not added_at_default(old, changed, "finetune.full.train.lr")  # in the file
    assert not added_at_default({}, {"populations": {"n": 3}}, "populations.n")
    store_report = {"fingerprint": {**new, "finetune": {"full": {"train": {"lr": 2e-3}}}}}
    path = Path(__file__).parent / "does-not-exist.json"
    with pytest.raises(SystemExit, match="no such file"):
        ResultStore(path, store_report, resume=True)


def test_a_real_difference_is_still_refused(tmp_path):
    recorded = tmp_path / "r.json"
    recorded.write_text(json.dumps({"fingerprint": {"finetune": {"train": {"lr": 1e-3}}},
                                    "runs": {}}))
    with pytest.raises(SystemExit, match=r"other settings \(differ: finetune.train.lr\)"):
        ResultStore(recorded, {"fingerprint": {"finetune": {"train": {"lr": 2e-3,
                                                                       "batch_dice": False}}}},
                    resume=True)


def test_a_new_results_file_never_replaces_one_already_there(tmp_path):
    """Without --resume-results a new run would start its file afresh: a recorded
    result at --out is refused unless --overwrite says so."""
    out = tmp_path / "quality_eval_cpu.json"
    out.write_text(json.dumps({"fingerprint": {}, "runs": {"probe/2shot/seed0/voco": {}}}))
    with pytest.raises(SystemExit, match=r"quality_eval_cpu.json exists; go on with it "
                                         r"\(--resume-results\), choose another --out, or "
                                         r"pass --overwrite"):
        ResultStore(out, {"fingerprint": {}}, resume=False)
    assert "probe/2shot/seed0/voco" in out.read_text()
    ResultStore(out, {"fingerprint": {}}, resume=False, overwrite=True).save()
    assert json.loads(out.read_text())["runs"] == {}
    assert quality_bench.parse_args(["--overwrite"]).overwrite
