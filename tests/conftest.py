"""Shared fixtures: small NIfTI files and phantom datasets made on the fly."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

SMALL_SHAPE = (48, 48, 32)


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


@pytest.fixture(scope="session")
def phantom_dataset(tmp_path_factory) -> Path:
    """Three small phantoms in Decathlon layout (returns the folder)."""
    from voco_core.data.phantoms import make_phantom_dataset

    out = tmp_path_factory.mktemp("phantoms")
    make_phantom_dataset(out, n=3, seed=0, shape=SMALL_SHAPE)
    return out


def tiny_config(overrides: dict | None = None):
    """The smallest VoCo config that runs: feature size 12, 40^3 crops at native size,
    a 2 x 2 grid over an 80 x 80 x 40 sample, m = 2, a 64-wide head."""
    from voco_core.config import make_config, merge

    base = {
        "data": {"target_size": [80, 80, 40]},
        "geometry": {"grid_size": 2, "num_random_crops": 2, "input_size": 40,
                     "resize_crops": False},
        "model": {"feature_size": 12, "head_hidden_dim": 64, "head_out_dim": 64},
        "optim": {"total_steps": 4, "warmup_steps": 1, "batch_size": 1, "lr": 3e-4},
        # deterministic: repeated runs must agree bit for bit in the exact-resume tests
        "run": {"device": "cpu", "checkpoint_every": 100, "log_every": 1, "tensorboard": False,
                "deterministic": True},
    }
    return make_config("tiny", merge(base, overrides or {}))


@pytest.fixture(scope="session")
def train_dataset(tmp_path_factory) -> Path:
    """Three 64 x 64 x 48 phantoms for training tests (returns the folder)."""
    from voco_core.data.phantoms import make_phantom_dataset

    out = tmp_path_factory.mktemp("train_phantoms")
    make_phantom_dataset(out, n=3, seed=1, shape=(64, 64, 48))
    return out


def tiny_finetune_config(overrides: dict | None = None):
    """The smallest finetuning config: SwinUNETR feature size 12, 64^3 crops, 2 steps."""
    from voco_core.config import make_finetune_config, merge

    base = {"train": {"total_steps": 2, "val_every": 2, "warmup_steps": 1,
                      "samples_per_volume": 1},
            "run": {"device": "cpu", "checkpoint_every": 100, "deterministic": True,
                    "tensorboard": False}}
    return make_finetune_config("tiny", merge(base, overrides or {}))


@pytest.fixture(scope="session")
def finetune_run(train_dataset, tmp_path_factory) -> Path:
    """A 2-step tiny finetuning run folder on ``train_dataset`` (best.pt and last.pt)."""
    from voco_core.train.finetune import finetune

    run_dir = tmp_path_factory.mktemp("finetune") / "run"
    result = finetune(tiny_finetune_config(), train_dataset, run_dir)
    assert result.step == 2 and not result.stopped
    return run_dir


@pytest.fixture(scope="session")
def pretrain_run(train_dataset, tmp_path_factory) -> Path:
    """A 1-step tiny pretraining run folder on ``train_dataset``."""
    from voco_core.train.pretrain import pretrain

    run_dir = tmp_path_factory.mktemp("pretrain") / "run"
    pretrain(tiny_config({"optim": {"total_steps": 1}}), train_dataset, run_dir)
    return run_dir
