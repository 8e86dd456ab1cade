"""qexport.heap: the free pages malloc keeps after blocks are freed go back to the system."""

import gc
import resource

import numpy as np
import pytest

from qexport import heap


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def test_release_returns_the_pages_of_freed_blocks() -> None:
    if not heap.release():
        pytest.skip("this C library has no malloc_trim")
    big = np.ones((16 << 20) // 8)
    del big  # a freed mapped block of 16 MiB: glibc then serves blocks below that from its heap
    kept, dropped = [], []
    for i in range(256):  # 1 MiB blocks, every other one freed: holes below the last block
        (kept if i % 2 else dropped).append(np.ones((1 << 20) // 8))
    full = _rss()
    del dropped
    gc.collect()
    held = _rss()
    if full - held > 64 << 20:
        pytest.skip("malloc unmapped the freed blocks itself (a fixed mmap threshold)")
    heap.release()
    assert held - _rss() > 64 << 20  # of the 128 MiB freed
    assert len(kept) == 128
