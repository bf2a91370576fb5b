"""The review benchmark's slice choices, its MRI-like contrast and its readings (the
runs themselves are the benchmark's, not the suite's); the sparse benchmark's report
imports (it once imported a module that had moved)."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import review_bench
from review_bench import MRI_T1, mri_like, pick_even, pick_random, summarise


def test_sparse_report_imports():
    from sparse import report

    assert callable(report.summarise)


def _mask(first: int, last: int, size: int = 64) -> np.ndarray:
    """Slices ``first..last`` hold foreground (a bool mask per slice)."""
    mask = np.zeros(size, bool)
    mask[first:last + 1] = True
    return mask


def test_even_fills_the_largest_gap_first():
    foreground = _mask(10, 30)
    assert pick_even(foreground, [10, 30], 1) == [20]
    assert pick_even(foreground, [10, 30], 3) == [15, 20, 25]
    # the ends count at half distance: systematic sampling's positions, not the edges
    assert pick_even(foreground, [20], 2) == [13, 27]
    assert pick_even(foreground, [], 3) == [13, 20, 27]


def test_random_stays_in_the_foreground_and_skips_annotated():
    foreground = _mask(5, 14)
    annotated = [5, 6, 7]
    picks = pick_random(foreground, annotated, 4, seed=3, round_=1)
    assert len(picks) == 4 and len(set(picks)) == 4
    assert set(picks) <= set(range(5, 15)) - set(annotated)
    assert picks == pick_random(foreground, annotated, 4, seed=3, round_=1)  # paired seeds
    assert picks != pick_random(foreground, annotated, 4, seed=4, round_=1)
    assert pick_random(foreground, list(range(5, 14)), 3, seed=0, round_=2) == [14]


def test_mri_like_orders_tissues_unlike_ct():
    labels = np.zeros((24, 24, 24), np.uint8)
    labels[2:22, 2:22, 2:22] = 1  # body
    labels[4:10, 4:10, 4:20] = 5  # liver
    labels[14:20, 14:20, 4:20] = 6  # spleen
    labels[4:10, 14:20, 4:20] = 4  # lungs
    image = mri_like(labels, seed=0)
    assert image.dtype == np.uint16 and image.shape == labels.shape

    def median(value):
        core = np.zeros_like(labels, bool)
        core[1:-1, 1:-1, 1:-1] = True  # away from blurred borders
        return float(np.median(image[(labels == value) & core]))

    # T1: fat-rich body brightest, liver above spleen (CT: nearly equal), lungs dark
    assert median(1) > median(5) > median(6) > median(4)
    assert MRI_T1[5] > MRI_T1[6]


def _row(dice: float, annotated: int) -> dict:
    return {"curve": [{"step": 1, "mean_dice": dice - 0.01}, {"step": 2, "mean_dice": dice}],
            "annotated": list(range(annotated))}


def test_summary_pairs_strategies_by_seed():
    runs = {}
    for seed, base in enumerate((0.40, 0.50, 0.45)):
        runs[f"seed{seed}/round0"] = _row(base, 2)
        runs[f"seed{seed}/uncertainty/round1"] = _row(base + 0.10, 4)
        runs[f"seed{seed}/random/round1"] = _row(base + 0.05, 4)
        runs[f"seed{seed}/even/round1"] = _row(base + 0.05 + 0.01 * seed, 4)
    report = {"runs": runs, "settings": {"rounds": 1, "contrast": "ct"}}
    summary = summarise(report)
    assert summary["seeds"] == 3
    first, second = summary["rounds"]
    assert first["strategies"]["random"]["mean_dice"] == pytest.approx(0.45)
    assert second["strategies"]["uncertainty"]["annotated"] == 4
    assert second["strategies"]["uncertainty"]["last_change"] == pytest.approx(0.01)
    paired = second["paired"]["uncertainty - random"]
    assert paired["mean"] == pytest.approx(0.05) and paired["wins"] == 3
    assert second["paired"]["random - even"]["diffs"] == pytest.approx([0.0, -0.01, -0.02])
    line = review_bench.summary_line(report)
    assert "uncertainty 0.550" in line and "uncertainty - random +0.050" in line


def test_summary_leaves_out_unfinished_rounds():
    runs = {"seed0/round0": _row(0.4, 2), "seed0/uncertainty/round1": _row(0.5, 4),
            "seed1/round0": _row(0.3, 2)}
    summary = summarise({"runs": runs, "settings": {"rounds": 1, "contrast": "mri"}})
    assert summary["rounds"][1]["strategies"] == {}  # seed 1 has no round 1 yet


def test_class_coverage_counts_classes_in_the_annotated_axial_slices(tmp_path):
    import nibabel as nib

    labels = np.zeros((6, 6, 5), np.uint8)
    labels[1:5, 1:5, :] = 1
    labels[2, 2, 1] = 5  # liver on axial slice 1 only
    labels[3, 3, 3] = 9  # aorta on axial slice 3 only
    folder = tmp_path / "ct-pool" / "labelsTr"
    folder.mkdir(parents=True)
    nib.save(nib.Nifti1Image(labels, np.eye(4)), folder / "phantom_002.nii.gz")
    runs = {"seed0/round0": {"subject": 2, "annotated": [1]},
            "seed0/even/round1": {"subject": 2, "annotated": [1, 3]}}
    report = {"work": str(tmp_path), "runs": runs, "settings": {"contrast": "ct", "rounds": 1}}
    assert review_bench.class_coverage(report) == {"seed0/round0": 2, "seed0/even/round1": 3}
    assert "| 1 | - | - | 3.0 |" in review_bench.coverage_markdown(report)
    assert review_bench.class_coverage({**report, "work": None}) == {}


def test_pooled_line_pairs_seeds_across_contrasts():
    def report(contrast, gains):
        runs = {}
        for seed, gain in enumerate(gains):
            runs[f"seed{seed}/round0"] = _row(0.2, 2)
            runs[f"seed{seed}/uncertainty/round1"] = _row(0.3, 4)
            runs[f"seed{seed}/random/round1"] = _row(0.3 + gain, 4)
            runs[f"seed{seed}/even/round1"] = _row(0.3, 4)
        return {"runs": runs, "settings": {"rounds": 1, "contrast": contrast}}

    line = review_bench.pooled_line([report("ct", [0.1, 0.2]), report("mri", [0.1, 0.2])])
    assert line.startswith("pooled over 4 pairs") and "random - uncertainty +0.150" in line
    assert "(4/4)" in line


def test_bad_inputs_end_in_one_line_and_a_results_file_is_never_replaced(tmp_path, capsys):
    out = tmp_path / "R.json"
    out.write_text("{}")
    with pytest.raises(SystemExit, match=r"--out .*R.json exists; continue it with --resume"):
        review_bench.main(["--quick", "--out", str(out), "--work", str(tmp_path / "w")])
    assert out.read_text() == "{}" and not (tmp_path / "w").exists()
    with pytest.raises(SystemExit, match=r"--summarize .*missing.json: cannot read"):
        review_bench.main(["--summarize", str(tmp_path / "missing.json")])
