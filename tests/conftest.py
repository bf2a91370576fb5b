"""Shared fixtures: small NIfTI files and phantom datasets made on the fly."""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

SMALL_SHAPE = (48, 48, 32)

if os.environ.get("PYTEST_XDIST_WORKER"):
    # `make test` runs one pytest-xdist worker per core: one compute thread each (also
    # in the CLI subprocesses the tests start), or the workers oversubscribe the cores.
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    os.environ.setdefault("MKL_NUM_THREADS", "1")


def save_nifti(path: Path, data: np.ndarray, affine: np.ndarray | None = None) -> Path:
    """Write ``data`` with plain nibabel (independent of the code under test)."""
    image = nib.Nifti1Image(data, np.eye(4) if affine is None else affine)
    image.set_data_dtype(data.dtype)
    nib.save(image, path)
    return path


def one_line_error(capsys, *fragments: str) -> str:
    """The captured stderr: exactly one ``voco: error: ...`` line holding every fragment."""
    err = capsys.readouterr().err
    assert err.startswith("voco: error: ") and err.count("\n") == 1, err
    assert "Traceback" not in err
    for fragment in fragments:
        assert fragment in err, err
    return err


@pytest.fixture
def rotated_affine() -> np.ndarray:
    """A non-trivial affine: LPS-like axes, anisotropic spacing, a small rotation."""
    angle = np.deg2rad(10.0)
    rotation = np.array(
        [[np.cos(angle), -np.sin(angle), 0], [np.sin(angle), np.cos(angle), 0], [0, 0, 1]]
    )
    affine = np.eye(4)
    affine[:3, :3] = rotation @ np.diag([-0.8, -0.8, 2.5])
    affine[:3, 3] = [120.5, -30.25, 400.0]
    return affine


def shared_folder(tmp_path_factory, name: str, make: Callable[[Path], None]) -> Path:
    """The folder ``name``, filled by ``make(folder)`` once per test session: under
    pytest-xdist the first worker that needs it makes it (holding a file lock in the
    session's common temporary folder) and the other workers reuse it. Tests treat it
    as read-only (copy it to change it)."""
    from filelock import FileLock

    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent  # one folder for all the workers of this session
    folder = root / f"shared-{name}"
    with FileLock(f"{folder}.lock"):
        if not (folder / ".complete").is_file():
            shutil.rmtree(folder, ignore_errors=True)
            folder.mkdir(parents=True)
            make(folder)
            (folder / ".complete").touch()
    return folder


@pytest.fixture(scope="session")
def phantom_dataset(tmp_path_factory) -> Path:
    """Three small phantoms in Decathlon layout (returns the folder)."""
    from voco_core.data.phantoms import make_phantom_dataset

    return shared_folder(tmp_path_factory, "phantoms",
                         lambda out: make_phantom_dataset(out, n=3, seed=0, shape=SMALL_SHAPE))


TEST_SWIN = {"depths": [1, 2, 1, 1], "num_heads": [1, 2, 2, 4]}
"""The tests' Swin: the tiny preset's widths (feature size 12) with one block per stage
where the preset has two (stage 2 keeps two, so shifted windows and their attention
mask still train) and fewer heads. A tiny step is 2-3x faster on one CPU thread, and
every code path stays. Pretraining and finetuning both use it, so backbones transfer."""
TEST_SWIN_SETS = [arg for key, value in TEST_SWIN.items()
                  for arg in ("--set", f"model.{key}={value}")]
""":data:`TEST_SWIN` as ``voco`` command-line overrides."""

EXACT = {"run": {"deterministic": True}}
"""Bit-reproducible runs (oneDNN off, one thread: about 30% slower on CPU), for the
tests that compare two runs value for value; the others train in the faster mode."""


def tiny_config(overrides: dict | None = None, exact: bool = False):
    """The smallest VoCo config that runs: feature size 12 (:data:`TEST_SWIN`), 40^3
    crops at native size, a 2 x 2 grid over an 80 x 80 x 40 sample, m = 2, a 64-wide
    head. ``exact``: deterministic mode (see :data:`EXACT`)."""
    from voco_core.config import make_pretrain_config, merge

    base = {
        "data": {"target_size": [80, 80, 40]},
        "geometry": {"grid_size": 2, "num_random_crops": 2, "input_size": 40,
                     "resize_crops": False},
        "model": {"feature_size": 12, "head_hidden_dim": 64, "head_out_dim": 64, **TEST_SWIN},
        "optim": {"total_steps": 4, "warmup_steps": 1, "batch_size": 1, "lr": 3e-4},
        "run": {"device": "cpu", "checkpoint_every": 100, "log_every": 1, "tensorboard": False,
                "deterministic": False},
    }
    return make_pretrain_config("tiny", merge(merge(base, EXACT if exact else {}), overrides or {}))


@pytest.fixture(scope="session")
def train_dataset(tmp_path_factory) -> Path:
    """Three 64 x 64 x 48 phantoms for training tests (returns the folder)."""
    from voco_core.data.phantoms import make_phantom_dataset

    return shared_folder(tmp_path_factory, "train_phantoms", lambda out: make_phantom_dataset(
        out, n=3, seed=1, shape=(64, 64, 48)))


def tiny_finetune_config(overrides: dict | None = None, exact: bool = False):
    """The smallest finetuning config: SwinUNETR feature size 12 (:data:`TEST_SWIN`),
    64^3 crops, 2 steps. ``exact``: deterministic mode (see :data:`EXACT`)."""
    from voco_core.config import make_finetune_config, merge

    # the file's spacing: the tests' small phantoms (6.25 mm voxels) are not resampled
    base = {"data": {"spacing": None}, "model": dict(TEST_SWIN),
            "train": {"total_steps": 2, "val_every": 2, "warmup_steps": 1,
                      "samples_per_volume": 1},
            "run": {"device": "cpu", "checkpoint_every": 100, "deterministic": False,
                    "tensorboard": False}}
    return make_finetune_config("tiny", merge(merge(base, EXACT if exact else {}),
                                              overrides or {}))


@pytest.fixture(scope="session")
def finetune_run(train_dataset, tmp_path_factory) -> Path:
    """A 2-step tiny finetuning run folder on ``train_dataset`` (best.pt and last.pt)."""
    from voco_core.train.finetune import finetune

    def make(folder: Path) -> None:
        result = finetune(tiny_finetune_config(), train_dataset, folder / "run")
        assert result.step == 2 and not result.stopped

    return shared_folder(tmp_path_factory, "finetune", make) / "run"


@pytest.fixture(scope="session")
def pretrain_run(train_dataset, tmp_path_factory) -> Path:
    """A 1-step tiny pretraining run folder on ``train_dataset``."""
    from voco_core.train.pretrain import pretrain

    return shared_folder(tmp_path_factory, "pretrain", lambda folder: pretrain(
        tiny_config({"optim": {"total_steps": 1}}), train_dataset, folder / "run")) / "run"
