"""Memory-efficient Swin window attention for CPU training.

MONAI's ``WindowAttention`` keeps each block's attention probabilities for the
backward pass: ``(windows, heads, n, n)`` floats with ``n = 343`` for 7^3 windows.
For one tiny pretraining step (13 crops of 40^3, full teacher) autograd saved
3.56 GiB, most of it these matrices. :class:`WindowAttentionFunction` computes the
same attention a few windows at a time and keeps only q, k, v and the output; the
backward pass recomputes each chunk's probabilities (as FlashAttention does):
0.66 GiB saved for the same step, about 19% more step time on 2 threads (median;
docs/benchmarks.md). Outputs and gradients equal MONAI's to float rounding (tested
to 1e-5).

``torch.nn.functional.scaled_dot_product_attention`` is no help here on CPU: with a
trainable relative-position bias as its mask it falls back to the plain maths,
which keeps the same ``(n, n)`` matrices.

:func:`swap_window_attention` switches a built network's ``WindowAttention``
modules between this implementation and MONAI's in place (same parameters, same
state dict). The network builders apply it; GPUs keep MONAI's code path.
"""

from __future__ import annotations

import torch
from monai.networks.nets.swin_unetr import WindowAttention
from torch import nn

CHUNK_BYTES = 4 * 2**20
"""Logits per chunk (bytes). Measured for the stage-1 attention of a tiny step (351
windows, forward + backward, one thread): 4 MB 3.5-3.7 s, 16 MB 5.0-6.1 s, 64 MB
4.6-5.2 s, MONAI's unchunked 5.2-7.2 s (docs/benchmarks.md)."""


def _chunk_windows(windows: int, period: int, row_bytes: int) -> int:
    """Windows per chunk: a divisor of ``period`` (the shift-mask period, 1 without a
    mask) so that every chunk's bias is one contiguous slice, else as many as fit."""
    target = max(1, CHUNK_BYTES // row_bytes)
    if period == 1:
        return min(target, windows)
    return max(d for d in range(1, period + 1) if period % d == 0 and d <= target)


class WindowAttentionFunction(torch.autograd.Function):
    """softmax(q k^T * scale + bias[i % P]) v for window i, in chunks of windows.

    ``q``, ``k``, ``v``: ``(b, h, n, d)`` (b = batch x windows); ``bias``:
    ``(P, h, n, n)``, the relative-position bias plus, for shifted windows, the
    shift mask of each of the P = nw windows (P = 1 without a mask); returns
    ``(b, h, n, d)``. Saves only the inputs and the output: the backward pass
    recomputes each chunk's probabilities (one more ``q k^T`` and softmax).
    """

    @staticmethod
    def forward(ctx, q, k, v, bias, scale: float):
        b, h, n, d = q.shape
        period = bias.shape[0]
        chunk = _chunk_windows(b, period, h * n * n * q.element_size())
        q3, k3, v3 = (t.reshape(b * h, n, d) for t in (q, k, v))
        out = torch.empty_like(q3)
        bias_rows = _bias_rows(bias, chunk)
        for start in range(0, b, chunk):
            rows = slice(start * h, min(start + chunk, b) * h)
            logits = _logits(q3, k3, bias_rows, period, start, rows, h, scale)
            probs = torch.softmax(logits, dim=-1)
            torch.bmm(probs, v3[rows], out=out[rows])
        ctx.save_for_backward(q, k, v, bias, out)
        ctx.scale, ctx.chunk = scale, chunk
        return out.view(b, h, n, d)

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, bias, out = ctx.saved_tensors
        scale, chunk = ctx.scale, ctx.chunk
        b, h, n, d = q.shape
        period = bias.shape[0]
        q3, k3, v3, out3 = (t.reshape(b * h, n, d) for t in (q, k, v, out))
        grad_o = grad_out.reshape(b * h, n, d)
        grad_q, grad_k, grad_v = (torch.empty_like(q3) for _ in range(3))
        grad_bias = torch.zeros_like(bias)
        # d softmax: dS = P * (dP - rowsum(dO * O)), the row sums computed once
        delta = (grad_o * out3).sum(dim=-1, keepdim=True)
        bias_rows = _bias_rows(bias, chunk)
        for start in range(0, b, chunk):
            stop = min(start + chunk, b)
            rows = slice(start * h, stop * h)
            logits = _logits(q3, k3, bias_rows, period, start, rows, h, scale)
            probs = torch.softmax(logits, dim=-1)
            torch.bmm(probs.transpose(1, 2), grad_o[rows], out=grad_v[rows])
            grad_logits = torch.bmm(grad_o[rows], v3[rows].transpose(1, 2))
            grad_logits.sub_(delta[rows]).mul_(probs)
            per_window = grad_logits.view(stop - start, h, n, n)
            if period == 1:
                grad_bias[0] += per_window.sum(dim=0)
            else:
                slot = start % period
                grad_bias[slot:slot + stop - start] += per_window
            torch.bmm(grad_logits, k3[rows], out=grad_q[rows]).mul_(scale)
            torch.bmm(grad_logits.transpose(1, 2), q3[rows], out=grad_k[rows]).mul_(scale)
        shape = (b, h, n, d)
        return grad_q.view(shape), grad_k.view(shape), grad_v.view(shape), grad_bias, None


def _bias_rows(bias: torch.Tensor, chunk: int) -> torch.Tensor:
    """``bias (P, h, n, n)`` as ``(rows, n, n)`` that :func:`_logits` slices without a
    copy: tiled ``chunk`` times without a mask (P = 1), as it is with one."""
    period, h, n, _ = bias.shape
    if period == 1:
        return bias.expand(chunk, h, n, n).reshape(chunk * h, n, n)
    return bias.reshape(period * h, n, n)


def _logits(q3, k3, bias_rows, period: int, start: int, rows: slice, h: int,
            scale: float) -> torch.Tensor:
    """``(w h, n, n)`` logits of the windows in ``rows`` (from window ``start``): one
    fused ``bias + scale * q k^T`` (``baddbmm``). The chunk divides the period and
    starts at a multiple of it, so its bias is one contiguous slice."""
    count = rows.stop - rows.start
    first = 0 if period == 1 else (start % period) * h
    return torch.baddbmm(bias_rows[first:first + count], q3[rows], k3[rows].transpose(1, 2),
                         alpha=scale)


class MemoryEfficientWindowAttention(WindowAttention):
    """MONAI's ``WindowAttention`` with :class:`WindowAttentionFunction` on CPU.

    Same parameters and state dict; MONAI's own forward runs where this one would not
    give the same result: on GPUs (bf16 autocast and MONAI's flash path there), under
    CPU autocast, and with attention dropout while training. Without autograd the
    chunks still bound the transient logits (e.g. the EMA teacher's pass)."""

    def forward(self, x, mask):
        if (not x.is_cpu or torch.is_autocast_enabled("cpu")
                or (self.training and self.attn_drop.p > 0)):
            return super().forward(x, mask)
        b, n, c = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, c // self.num_heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        bias = self.relative_position_bias_table[
            self.relative_position_index[:n, :n].reshape(-1)].reshape(n, n, -1)
        bias = bias.permute(2, 0, 1).unsqueeze(0)  # (1, h, n, n)
        if mask is not None:  # (nw, n, n): window i of the batch takes mask[i % nw]
            bias = bias + mask.to(bias.dtype).unsqueeze(1)
        attended = WindowAttentionFunction.apply(q.contiguous(), k.contiguous(),
                                                 v.contiguous(), bias.contiguous(), self.scale)
        return self.proj_drop(self.proj(attended.transpose(1, 2).reshape(b, n, c)))


def swap_window_attention(model: nn.Module, memory_efficient: bool = True) -> nn.Module:
    """Switch every ``WindowAttention`` in ``model`` to the memory-efficient class
    (``True``) or back to MONAI's (``False``), in place; returns ``model``."""
    target = MemoryEfficientWindowAttention if memory_efficient else WindowAttention
    for module in model.modules():
        if isinstance(module, WindowAttention):
            module.__class__ = target
    return model
