"""The ``voco`` command: exit codes, output, one-line errors without tracebacks."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from voco_core import __version__
from voco_core.cli import main

from conftest import save_nifti

VOCO = shutil.which("voco", path=str(Path(sys.executable).parent)) or "voco"


def run_voco(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([VOCO, *args], capture_output=True, text=True, timeout=120)


def test_console_script_version():
    result = run_voco("--version")
    assert result.returncode == 0
    assert result.stdout.strip() == f"voco {__version__}"


def test_make_phantoms_then_info(tmp_path):
    out = tmp_path / "ph"
    result = run_voco("make-phantoms", "--out", str(out), "-n", "2", "--seed", "1",
                      "--shape", "48", "48", "32")
    assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in (out / "imagesTr").iterdir()) == [
        "phantom_000.nii.gz", "phantom_001.nii.gz"]
    assert (out / "dataset.json").is_file() and (out / "labelsTr" / "phantom_001.nii.gz").is_file()

    info = run_voco("info", str(out / "imagesTr" / "phantom_000.nii.gz"))
    assert info.returncode == 0, info.stderr
    assert "48 x 48 x 32 voxels (int16)" in info.stdout
    assert "8.3333 x 8.3333 x 9 mm" in info.stdout
    assert "orientation  RAS" in info.stdout
    assert "intensity    min -1024" in info.stdout
    assert "opens as     Image (negative values" in info.stdout
    labels = run_voco("info", str(out / "labelsTr" / "phantom_000.nii.gz"))
    assert "opens as     Labels (" in labels.stdout, labels.stdout


def test_info_json(tmp_path, capsys):
    path = save_nifti(tmp_path / "v.nii.gz", np.zeros((4, 5, 6), np.float32))
    assert main(["info", str(path), "--json"]) == 0
    assert '"shape": [4, 5, 6]' in capsys.readouterr().out


def _bad_files(tmp_path: Path) -> dict[str, Path]:
    text = tmp_path / "notes.txt"
    text.write_text("x")
    truncated = tmp_path / "truncated.nii.gz"
    good = save_nifti(tmp_path / "good.nii.gz", np.ones((32, 32, 32), np.float32))
    truncated.write_bytes(good.read_bytes()[:200])
    return {
        "missing": tmp_path / "absent.nii.gz",
        "not_nifti": text,
        "truncated": truncated,
        "two_d": save_nifti(tmp_path / "flat.nii.gz", np.zeros((8, 8), np.float32)),
        # a 4-D file with channels last is a multi-channel image now (test_channels.py);
        # 5-D is still no volume
        "five_d": save_nifti(tmp_path / "multi.nii.gz", np.zeros((8, 8, 8, 2, 2), np.float32)),
        "all_nan": save_nifti(tmp_path / "nan.nii.gz", np.full((4, 4, 4), np.nan, np.float32)),
    }


@pytest.mark.parametrize("case", ["missing", "not_nifti", "truncated", "two_d", "five_d",
                                  "all_nan"])
def test_info_bad_input_one_line_exit_1(tmp_path, capsys, case):
    path = _bad_files(tmp_path)[case]
    assert main(["info", str(path)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("voco: error: ") and path.name in err
    assert err.count("\n") == 1 and "Traceback" not in err


def test_info_bad_input_through_console_script(tmp_path):
    result = run_voco("info", str(tmp_path / "absent.nii"))
    assert result.returncode == 1
    assert result.stderr == f"voco: error: {tmp_path / 'absent.nii'}: image file not found\n"


def test_usage_errors_exit_2(tmp_path, capsys):
    with pytest.raises(SystemExit) as info:
        main(["make-phantoms", "--out", str(tmp_path), "-n", "0"])
    assert info.value.code == 2
    assert "expected a number >= 1" in capsys.readouterr().err
    assert main(["make-phantoms", "--out", str(tmp_path), "--shape", "8", "64", "64"]) == 1
    assert "--shape" in capsys.readouterr().err
    assert main([]) == 2
