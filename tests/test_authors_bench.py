"""The authors-vs-ours benchmark section skips cleanly without the authors' code."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import authors_bench


@pytest.mark.parametrize("given", ["none", "not_a_checkout"])
def test_authors_section_skips_with_one_line(given, tmp_path, monkeypatch, capsys):
    monkeypatch.delenv(authors_bench.REPO_ENV, raising=False)
    repo = None if given == "none" else str(tmp_path)
    section = authors_bench.bench_authors(repo, "cpu", steps=1)
    assert set(section) == {"skipped"}
    expected = "--authors-repo PATH or VOCO_AUTHORS_REPO" if repo is None else "lacks"
    assert expected in section["skipped"]
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"pretrain_bench: authors section skipped: {section['skipped']}"]
    assert authors_bench.summary(section).startswith("authors skipped (")
