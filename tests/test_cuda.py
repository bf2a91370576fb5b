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


def test_batch_size_auto_probes_the_gpu_and_trains(train_dataset, tmp_path):
    """The real probe on the GPU: the tiny model's 1 volume per step fits without
    checkpointing, the probe frees what it allocated, and one step runs."""
    from voco_core.train.batch_size import probe_cuda_memory
    from voco_core.train.pretrain import pretrain

    from conftest import tiny_config

    config = tiny_config({"optim": {"batch_size": "auto", "total_steps": 1},
                          "run": {"device": "cuda"}})
    torch.cuda.empty_cache()
    before = torch.cuda.memory_allocated()
    probe = probe_cuda_memory(config, torch.device("cuda"), False)
    assert probe is not None and probe.per_volume > 0 and probe.fixed > 0
    assert torch.cuda.memory_allocated() == before
    result = pretrain(config, train_dataset, tmp_path / "run")
    assert result.history[0].message.startswith("optim.batch_size auto: 1 volume(s)")
    assert "checkpointing off" in result.history[0].message and result.step == 1


@pytest.mark.parametrize("shifted", [False, True])
def test_sdpa_window_attention_on_cuda_equals_monai(shifted, full_float32_on_cuda):
    """The GPU path (SDPA, the memory-efficient kernel where it takes the mask) against
    MONAI's forward on the same GPU: outputs and gradients in float32 (base's head
    size 16), then a bf16 autocast forward + backward that must stay finite."""
    import copy

    from monai.networks.nets.swin_unetr import WindowAttention, compute_mask

    from voco_core.attention import swap_window_attention

    torch.manual_seed(0)
    monai_block = WindowAttention(48, 3, (7, 7, 7), qkv_bias=True).cuda()
    torch.nn.init.normal_(monai_block.relative_position_bias_table, std=0.5)
    ours = swap_window_attention(copy.deepcopy(monai_block))
    assert ours.path(torch.zeros(1, device="cuda")) == "sdpa"
    mask = compute_mask([14, 14, 14], (7, 7, 7), (3, 3, 3), "cuda") if shifted else None
    x = torch.randn(16, 343, 48, device="cuda")

    def run(block, inputs):
        inputs = inputs.clone().requires_grad_()
        out = block(inputs, mask)
        out.square().mean().backward()
        grads = [inputs.grad, block.qkv.weight.grad, block.relative_position_bias_table.grad]
        block.zero_grad()
        return out, grads

    got, got_grads = run(ours, x)
    expected, expected_grads = run(monai_block, x)
    for a, b in zip([got, *got_grads], [expected, *expected_grads], strict=True):
        torch.testing.assert_close(a, b, atol=1e-5 * float(b.abs().max()), rtol=1e-4)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out, grads = run(ours, x)
    assert out.dtype == torch.bfloat16
    assert all(torch.isfinite(g).all() for g in grads)
