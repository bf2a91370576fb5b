"""CPU memory behaviour of training.

A training step allocates and frees the same large activation buffers every step.
glibc's malloc serves blocks above its mmap threshold (at most 32 MB) with fresh
``mmap`` calls and returns them on free, so every step page-faults (the kernel
zeroes) all of that memory again, and system time rivals the step's compute.
:func:`retain_freed_memory` tells glibc to serve large blocks from its heap and never
trim it, so freed blocks are reused: steps about twice as fast, at the price of a
higher peak resident set (docs/benchmarks.md, "memory").
:func:`release_freed_memory` undoes it after training.
"""

from __future__ import annotations

import ctypes
import sys

# mallopt parameter numbers from glibc's malloc.h
_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4
_DEFAULT_TRIM_THRESHOLD, _DEFAULT_MMAP_MAX = 128 * 1024, 65536


def _glibc():
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return None
    return libc if hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim") else None


def retain_freed_memory() -> bool:
    """Keep freed heap memory for reuse (glibc only). Returns True when applied."""
    libc = _glibc()
    if libc is None:
        return False
    return bool(libc.mallopt(_M_MMAP_MAX, 0) == 1
                and libc.mallopt(_M_TRIM_THRESHOLD, 2**31 - 1) == 1)


def release_freed_memory() -> None:
    """Restore glibc's defaults and give unused heap memory back to the system."""
    libc = _glibc()
    if libc is None:
        return
    libc.mallopt(_M_MMAP_MAX, _DEFAULT_MMAP_MAX)
    libc.mallopt(_M_TRIM_THRESHOLD, _DEFAULT_TRIM_THRESHOLD)
    libc.malloc_trim(0)


def saved_tensor_bytes(forward) -> int:
    """Bytes autograd keeps for the backward pass while ``forward()`` runs (the sum
    over every tensor an op saves; a tensor saved by two ops counts twice)."""
    import torch

    total = 0

    def pack(tensor):
        nonlocal total
        total += tensor.numel() * tensor.element_size()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        forward()
    return total
