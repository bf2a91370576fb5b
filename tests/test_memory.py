"""voco_core.memory: the glibc allocator switch of CPU training, and the count of the
bytes autograd keeps for the backward pass."""

from __future__ import annotations

import ctypes
import os
import sys

import pytest
import torch

from voco_core.memory import release_freed_memory, retain_freed_memory, saved_tensor_bytes

BLOCK = 64 * 1024 * 1024  # 256 MB of float32: far above glibc's mmap threshold


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks",
        "uordblks", "fordblks", "keepcost")]


def _mallinfo():
    libc = ctypes.CDLL("libc.so.6")
    if not hasattr(libc, "mallinfo2"):
        pytest.skip("glibc without mallinfo2")
    libc.mallinfo2.restype = _MallInfo2
    return libc.mallinfo2


def _resident_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc only")
def test_retain_keeps_freed_blocks_for_reuse_and_release_gives_them_back():
    mallinfo = _mallinfo()
    try:
        assert retain_freed_memory() is True
        block = torch.ones(BLOCK)
        assert mallinfo().hblkhd < BLOCK * 4  # served from the heap, not a fresh mmap
        del block
        kept = _resident_bytes()  # freed, yet still resident: the next step reuses it
        assert mallinfo().fordblks >= BLOCK * 4  # freed into the heap, kept there
        heap = mallinfo().arena
        # 256 KB smaller: a small allocation in between may land in the freed chunk,
        # and a same-sized block would then no longer fit in what is left of it
        again = torch.ones(BLOCK - 256 * 1024)
        assert float(again[-1]) == 1.0
        # reused: the heap took nothing more from the system. (Resident size is no
        # measure here: earlier tests' trims leave free chunks whose pages were given
        # back, and best fit may pick one of those, faulting its pages in again.)
        assert mallinfo().arena - heap < BLOCK
        del again
    finally:
        release_freed_memory()
    assert kept - _resident_bytes() > BLOCK * 4 * 0.8  # given back to the system
    big = torch.ones(BLOCK)  # the default again: a large block is its own mmap
    assert mallinfo().hblkhd >= BLOCK * 4
    del big


def test_saved_tensor_bytes_counts_what_backward_keeps():
    x = torch.ones(1000, requires_grad=True)  # 4,000 bytes
    assert saved_tensor_bytes(lambda: (x * 2.0).sum()) == 0  # a scalar factor saves nothing
    assert saved_tensor_bytes(lambda: (x * x).sum()) == 2 * 4000  # both factors, counted twice
    assert saved_tensor_bytes(lambda: x.exp().sum()) == 4000  # exp keeps its output
