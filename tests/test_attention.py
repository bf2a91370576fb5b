"""Memory-efficient window attention: MONAI's maths, a fraction of its saved activations."""

import copy

import pytest
import torch
from monai.networks.nets.swin_unetr import SwinTransformer, WindowAttention, compute_mask

from voco_core import attention
from voco_core.attention import (
    MemoryEfficientWindowAttention,
    WindowAttentionFunction,
    swap_window_attention,
    window_attention_backend,
)
from voco_core.config import make_pretrain_config
from voco_core.memory import saved_tensor_bytes
from voco_core.models import VoCoBackbone


def swin(seed: int = 0) -> SwinTransformer:
    torch.manual_seed(seed)
    return SwinTransformer(in_chans=1, embed_dim=12, window_size=(7, 7, 7), patch_size=(2, 2, 2),
                           depths=(2, 2, 2, 2), num_heads=(3, 6, 12, 24), spatial_dims=3)


def outputs_and_grads(net: torch.nn.Module, x: torch.Tensor, *args):
    """``net(x, *args)`` (one tensor or a list) and the gradients of a fixed weighted
    sum of it: every parameter's and the input's (``"input"``)."""
    net.zero_grad()
    x = x.detach().requires_grad_()
    out = net(x, *args)
    hidden = out if isinstance(out, list | tuple) else [out]
    sum((h * torch.linspace(-1, 1, h.numel()).view_as(h)).sum() for h in hidden).backward()
    grads = {name: p.grad.clone() for name, p in net.named_parameters()}
    return [h.detach() for h in hidden], {**grads, "input": x.grad}


def assert_equal_to_monai(ours, monai, x: torch.Tensor, *args):
    """Outputs (also without autograd) to 1e-5, gradients to 1e-5 of each tensor's
    largest."""
    expected, expected_grads = outputs_and_grads(monai, x, *args)
    got, grads = outputs_and_grads(ours, x, *args)
    for a, b in zip(got, expected, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    for name, grad in expected_grads.items():
        error = (grads[name] - grad).abs().max().item()
        assert error <= 1e-5 * grad.abs().max().item(), (name, error)
    with torch.no_grad():  # e.g. the EMA teacher and sliding-window inference
        got, expected = ours(x, *args), monai(x, *args)
        for a, b in zip(*(h if isinstance(h, list) else [h] for h in (got, expected)),
                        strict=True):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_outputs_and_gradients_equal_monai_in_float32():
    """Both window kinds run: 40^3 pads to 21^3 tokens (3^3 windows of 7^3, shifted
    every second block with MONAI's mask), the deeper stages use smaller windows."""
    monai_net = swin()
    ours = swap_window_attention(copy.deepcopy(monai_net))
    assert sum(isinstance(m, MemoryEfficientWindowAttention) for m in ours.modules()) == 8
    x = torch.randn(2, 1, 40, 40, 40, generator=torch.Generator().manual_seed(1))
    assert_equal_to_monai(ours, monai_net, x, True)


def window_block(seed: int = 0) -> WindowAttention:
    """A stage-1 block of the tiny network (dim 12, 3 heads, 7^3 windows), with a
    relative-position bias table that is not near zero."""
    torch.manual_seed(seed)
    block = WindowAttention(12, 3, (7, 7, 7))
    torch.nn.init.normal_(block.relative_position_bias_table)
    return block


@pytest.mark.parametrize("shifted", [False, True])
def test_sdpa_path_equals_monai_in_float32(shifted, monkeypatch):
    """SDPA forced on CPU, one block on 2 volumes: without a mask, and with MONAI's
    shift mask of a 14^3-token volume (nw = 8 windows, b = 16; window i takes
    mask[i % nw]). The mask reaches SDPA once per block, not per window."""
    monai_block = window_block()
    ours = swap_window_attention(copy.deepcopy(monai_block))
    nw = 8
    mask = compute_mask([14, 14, 14], (7, 7, 7), (3, 3, 3), "cpu") if shifted else None
    if shifted:
        assert mask.shape == (nw, 343, 343) and mask.min() < 0
    x = torch.randn(2 * nw, 343, 12, generator=torch.Generator().manual_seed(3))
    masks = []
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def spy(q, k, v, attn_mask=None, **kwargs):
        masks.append(attn_mask.shape)
        return sdpa(q, k, v, attn_mask=attn_mask, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", spy)
    with window_attention_backend("sdpa"):
        assert ours.path(x) == "sdpa"
        assert_equal_to_monai(ours, monai_block, x, mask)
    assert masks and {shape[0] for shape in masks} == {1}
    assert MemoryEfficientWindowAttention.backend == "auto"


def test_sdpa_path_casts_the_mask_to_autocast_dtype():
    """Under autocast q is bf16: the float32 bias is cast (bf16 rounding only)."""
    monai_block, mask = window_block(), compute_mask([14, 14, 14], (7, 7, 7), (3, 3, 3), "cpu")
    ours = swap_window_attention(copy.deepcopy(monai_block))
    x = torch.randn(16, 343, 12, generator=torch.Generator().manual_seed(4))
    with window_attention_backend("sdpa"), torch.autocast("cpu", torch.bfloat16):
        got, expected = ours(x, mask), monai_block(x, mask)
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), expected.float(), atol=3e-2, rtol=3e-2)


def test_paths_by_device_autocast_and_backend():
    block = swap_window_attention(window_block())
    cpu, gpu_like = torch.zeros(1), torch.zeros(1, device="meta")
    assert (block.path(cpu), block.path(gpu_like)) == ("chunked", "sdpa")
    with torch.autocast("cpu", torch.bfloat16):
        assert block.path(cpu) == "monai"
        with window_attention_backend("sdpa"):
            assert block.path(cpu) == "sdpa"
    for backend in ("chunked", "sdpa", "monai"):
        with window_attention_backend(backend):
            assert block.path(gpu_like) == backend
    with pytest.raises(ValueError, match="flash"):
        window_attention_backend("flash").__enter__()


def test_function_gradients_match_autograd_of_the_plain_formula():
    """q, k, v and the per-window bias (relative-position bias + shift mask: window i
    takes bias[i % P]), against autograd of softmax(q k^T s + bias) v in float64,
    with chunks that split the windows (the chunk divides the period P)."""
    g = torch.Generator().manual_seed(2)
    nw, heads, n, d = 6, 2, 10, 4
    q, k, v = (torch.randn(2 * nw, heads, n, d, generator=g, dtype=torch.float64,
                           requires_grad=True) for _ in range(3))
    relative = torch.randn(1, heads, n, n, generator=g, dtype=torch.float64)
    shift = torch.where(torch.rand(nw, 1, n, n, generator=g) > 0.7, -100.0, 0.0).double()
    for bias in (relative, relative + shift):  # P = 1 and P = nw
        bias = bias.clone().requires_grad_()

        def plain(q, k, v, bias, period=bias.shape[0]):
            logits = (q @ k.transpose(-2, -1) * 0.5).view(-1, period, heads, n, n) + bias
            return logits.view(-1, heads, n, n).softmax(-1) @ v

        for chunk_bytes in (8 * heads * n * n, 2**22):  # 1 window per chunk... all at once
            attention.CHUNK_BYTES = chunk_bytes
            try:
                torch.autograd.gradcheck(
                    lambda q, k, v, bias: WindowAttentionFunction.apply(q, k, v, bias, 0.5),
                    (q, k, v, bias))
                torch.testing.assert_close(WindowAttentionFunction.apply(q, k, v, bias, 0.5),
                                           plain(q, k, v, bias))
            finally:
                attention.CHUNK_BYTES = 4 * 2**20


def saved_bytes(net: torch.nn.Module, x: torch.Tensor) -> int:
    """Bytes autograd keeps for the backward pass of one forward."""
    return saved_tensor_bytes(lambda: net(x, True))


def test_each_tiny_crop_saves_a_fraction_of_monai_activations():
    """Per 40^3 crop (the tiny preset's), MONAI keeps every block's (windows, heads,
    343, 343) probabilities; the memory-efficient attention keeps q, k, v and the
    output (its per-block bias does not grow with the batch)."""
    monai_net = swin()
    ours = swap_window_attention(copy.deepcopy(monai_net))

    def per_crop(net):
        one, two = (saved_bytes(net, torch.randn(b, 1, 40, 40, 40)) for b in (1, 2))
        return two - one

    monai_bytes, our_bytes = per_crop(monai_net), per_crop(ours)
    # 2 x 38 MB of probabilities at stage 1, 2 x 23 MB at stage 2, some saved twice
    assert monai_bytes > 150e6
    assert our_bytes < monai_bytes / 8


def test_backbones_use_it_and_swapping_back_keeps_the_state_dict():
    backbone = VoCoBackbone(make_pretrain_config("tiny").model)
    kinds = {type(m) for m in backbone.modules() if isinstance(m, WindowAttention)}
    assert kinds == {MemoryEfficientWindowAttention}
    state = copy.deepcopy(backbone.state_dict())
    swap_window_attention(backbone, memory_efficient=False)
    assert {type(m) for m in backbone.modules() if isinstance(m, WindowAttention)} == {
        WindowAttention}
    assert backbone.state_dict().keys() == state.keys()


@pytest.mark.parametrize("backend", ["auto", "sdpa"])
@pytest.mark.parametrize("drop", [0.0, 0.5])
def test_attention_dropout_in_training_falls_back_to_monai(drop, backend):
    torch.manual_seed(0)
    attention = WindowAttention(12, 3, (3, 3, 3), attn_drop=drop)
    ours = swap_window_attention(copy.deepcopy(attention))
    x = torch.randn(4, 27, 12)
    with window_attention_backend(backend):
        assert ours.path(x) == ("monai" if drop else "chunked" if backend == "auto" else "sdpa")
        torch.manual_seed(5)
        expected = attention(x, None)
        torch.manual_seed(5)
        got = ours(x, None)
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-5)
