"""The CUDA paths of finetuning and inference (skipped without a GPU, e.g. in CI)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import tiny_finetune_config

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA only")


def test_bf16_finetune_step_segment_and_release_on_cuda(train_dataset, tmp_path):
    from voco_core.data.io import read_volume
    from voco_core.inference import load_segmenter, segment
    from voco_core.train.finetune import iter_finetune

    config = tiny_finetune_config({"train": {"amp": "bf16", "total_steps": 2, "val_every": 2},
                                   "run": {"device": "cuda", "deterministic": False}})
    events = list(iter_finetune(config, train_dataset, tmp_path / "run"))
    assert events[-1].kind == "done" and np.isfinite(events[-2].loss)
    assert np.isfinite(events[-1].mean_dice)

    torch.cuda.empty_cache()
    before = torch.cuda.memory_allocated()
    segmenter = load_segmenter(tmp_path / "run", device="cuda")
    record = read_volume(train_dataset / "imagesTr" / "phantom_000.nii.gz")
    cpu = segment(record, load_segmenter(tmp_path / "run", device="cpu")).labels
    gpu = segment(record, segmenter).labels
    assert gpu.shape == record.shape
    assert (gpu == cpu).mean() > 0.99  # float rounding may flip a few boundary voxels
    segmenter.release()
    del segmenter
    import gc

    gc.collect()
    assert torch.cuda.memory_allocated() <= before


@pytest.fixture
def full_float32_on_cuda():
    """cuDNN convolutions use TF32 by default: on an H200 that moved the predicted
    overlaps by up to 4.4e-3 against the CPU, and by 8.5e-6 without it (measured)."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def test_positions_on_cuda_match_cpu(pretrain_run, train_dataset, full_float32_on_cuda):
    from voco_core.data.io import read_volume
    from voco_core.inference import load_position_model, positions

    record = read_volume(train_dataset / "imagesTr" / "phantom_001.nii.gz")
    on_cpu = positions(record, load_position_model(pretrain_run, "cpu"), n=4, seed=2)
    on_gpu = positions(record, load_position_model(pretrain_run, "cuda"), n=4, seed=2)
    np.testing.assert_array_equal(on_gpu.true, on_cpu.true)
    np.testing.assert_allclose(on_gpu.predicted, on_cpu.predicted, atol=1e-4)
