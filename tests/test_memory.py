"""glibc allocator switch used during CPU training."""

from __future__ import annotations

import sys

import pytest
import torch

from voco_core.memory import release_freed_memory, retain_freed_memory


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc only")
def test_retain_then_release_keeps_torch_working():
    assert retain_freed_memory() is True
    a = torch.ones(64, 1024, 1024)  # 256 MB: above glibc's mmap threshold
    del a
    b = torch.ones(64, 1024, 1024)
    assert float(b[0, 0, 0]) == 1.0
    del b
    release_freed_memory()
    assert float(torch.zeros(8).sum()) == 0.0
