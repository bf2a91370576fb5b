"""Swin window attention: MONAI's maths, without its saved probabilities.

MONAI's ``WindowAttention`` keeps each block's attention probabilities for the
backward pass: ``(windows, heads, n, n)`` floats with ``n = 343`` for 7^3 windows.
For one tiny pretraining step (13 crops of 40^3, full teacher) autograd saved
3.56 GiB, most of it these matrices. :class:`MemoryEfficientWindowAttention` (same
parameters, same state dict) computes the same attention on one of three paths:

- **CPU: chunked** (:class:`WindowAttentionFunction`): a few windows at a time,
  keeping only q, k, v and the output; the backward pass recomputes each chunk's
  probabilities (as FlashAttention does): 0.66 GiB saved for the same step, about
  19% more step time on 2 threads (median; docs/benchmarks.md).
  ``torch.nn.functional.scaled_dot_product_attention`` is no help on CPU: with a
  trainable relative-position bias as its mask it runs the plain-maths kernel and
  keeps the same ``(n, n)`` matrices (a tiny step saves about a fifth of MONAI's
  activations at the same speed; ``pretrain_bench.py --sections attention``).
- **GPUs: SDPA** (:func:`sdpa_window_attention`, also under autocast):
  ``scaled_dot_product_attention`` with the bias (relative-position bias plus
  MONAI's shift mask) as ``attn_mask``; the windows are folded into the head axis
  so that one ``(1, windows x heads, n, n)`` mask broadcasts over the volumes
  (no per-window copy). While the bias needs a gradient, only the memory-efficient
  kernel (which returns one) and the plain maths are allowed: cuDNN's has no
  gradient for the mask.
- **MONAI's own forward** under CPU autocast (the chunks are not written for it)
  and with attention dropout while training (MONAI's random numbers).

Both other paths equal MONAI's outputs and gradients to float rounding in float32
(tested to 1e-5 on CPU, the SDPA path forced). :func:`window_attention_backend` forces one path
(tests, benchmarks). :func:`swap_window_attention` switches a built network's
``WindowAttention`` modules between this class and MONAI's in place; the network
builders apply it.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from monai.networks.nets.swin_unetr import WindowAttention
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

BACKENDS = ("auto", "chunked", "sdpa", "monai")
"""Paths of :class:`MemoryEfficientWindowAttention`: ``auto`` (chunked on CPU, SDPA
elsewhere), or one forced (see :meth:`MemoryEfficientWindowAttention.path`)."""

CHUNK_BYTES = 4 * 2**20
"""Logits per chunk (bytes): the fastest of the sizes tried on CPU; larger chunks
leave the cache (``pretrain_bench.py --sections attention``, docs/benchmarks.md)."""


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


def sdpa_window_attention(q, k, v, bias, scale: float) -> torch.Tensor:
    """softmax(q k^T * scale + bias[i % P]) v for window i, through
    ``torch.nn.functional.scaled_dot_product_attention``.

    Same arguments and result as :class:`WindowAttentionFunction` (``q``, ``k``,
    ``v``: ``(b, h, n, d)``, ``bias``: ``(P, h, n, n)``). Window ``i = j P + w`` of
    volume ``j`` becomes head ``w h + head`` of batch row ``j``, so the bias is one
    ``(1, P h, n, n)`` mask that SDPA broadcasts over the ``b / P`` rows, in q's dtype
    (bf16 under autocast). Kernels that cannot return the mask's gradient are
    excluded while it needs one."""
    b, h, n, d = q.shape
    period = bias.shape[0]
    q, k, v = (t.reshape(b // period, period * h, n, d) for t in (q, k, v))
    mask = bias.reshape(1, period * h, n, n).to(q.dtype)
    kernels = (sdpa_kernel([SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH])
               if mask.requires_grad else contextlib.nullcontext())
    with kernels:
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
    return out.reshape(b, h, n, d)


class MemoryEfficientWindowAttention(WindowAttention):
    """MONAI's ``WindowAttention`` computed on the path :meth:`path` picks.

    Same parameters and state dict. Without autograd the chunks still bound the
    transient logits on CPU (e.g. the EMA teacher's pass)."""

    backend = "auto"
    """One of :data:`BACKENDS`, for every instance (set it with
    :func:`window_attention_backend`) or one (an instance attribute)."""

    def path(self, x: torch.Tensor) -> str:
        """``"chunked"``, ``"sdpa"`` or ``"monai"`` for input ``x``: ``auto`` takes
        the chunks on CPU and SDPA elsewhere. MONAI's forward runs when forced, with
        attention dropout while training, and instead of the chunks under autocast."""
        backend = self.backend
        if backend not in BACKENDS:
            raise ValueError(f"window attention backend {backend!r} not in {BACKENDS}")
        if backend == "monai" or (self.training and self.attn_drop.p > 0):
            return "monai"
        if backend == "auto":
            backend = "chunked" if x.is_cpu else "sdpa"
        device = x.device.type
        if backend == "chunked" and torch.amp.is_autocast_available(device) \
                and torch.is_autocast_enabled(device):
            return "monai"
        return backend

    def forward(self, x, mask):
        path = self.path(x)
        if path == "monai":
            return super().forward(x, mask)
        b, n, c = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, c // self.num_heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        bias = self.relative_position_bias_table[
            self.relative_position_index[:n, :n].reshape(-1)].reshape(n, n, -1)
        bias = bias.permute(2, 0, 1).unsqueeze(0)  # (1, h, n, n)
        if mask is not None:  # (nw, n, n): window i of the batch takes mask[i % nw]
            bias = bias + mask.to(bias.dtype).unsqueeze(1)
        if path == "sdpa":
            attended = sdpa_window_attention(q, k, v, bias, self.scale)
        else:
            attended = WindowAttentionFunction.apply(q.contiguous(), k.contiguous(),
                                                     v.contiguous(), bias.contiguous(),
                                                     self.scale)
        return self.proj_drop(self.proj(attended.transpose(1, 2).reshape(b, n, c)))


@contextlib.contextmanager
def window_attention_backend(backend: str):
    """Within the block, every :class:`MemoryEfficientWindowAttention` without an
    instance ``backend`` takes ``backend`` (one of :data:`BACKENDS`), e.g. the SDPA
    path on CPU for tests and benchmarks."""
    if backend not in BACKENDS:
        raise ValueError(f"window attention backend {backend!r} not in {BACKENDS}")
    previous = MemoryEfficientWindowAttention.backend
    MemoryEfficientWindowAttention.backend = backend
    try:
        yield
    finally:
        MemoryEfficientWindowAttention.backend = previous


def swap_window_attention(model: nn.Module, memory_efficient: bool = True) -> nn.Module:
    """Switch every ``WindowAttention`` in ``model`` to the memory-efficient class
    (``True``) or back to MONAI's (``False``), in place; returns ``model``."""
    target = MemoryEfficientWindowAttention if memory_efficient else WindowAttention
    for module in model.modules():
        if isinstance(module, WindowAttention):
            module.__class__ = target
    return model
