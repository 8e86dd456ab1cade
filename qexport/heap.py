"""Freed heap memory handed back to the system. glibc's malloc keeps the pages of freed blocks in
its arenas (one per thread that allocated, up to 8 per core) and raises its mmap threshold after a
mapped block is freed, so the float64 weights, Hessian parts and activations a build makes and
drops stay resident as holes in its heaps. ``release`` asks malloc to return what is free
(``malloc_trim``) where a build has just dropped a scored plan or a written model, and when a
planning thread pool closes (passes.pool); elsewhere than glibc there is nothing to ask and it
returns False. Measured: docs/benchmarks.md ("Host memory and the allocator")."""

from __future__ import annotations

import ctypes
import ctypes.util
from functools import cache
from typing import Any


@cache
def _malloc_trim() -> Any:
    """glibc's malloc_trim, or None where the C library has none (musl, macOS, Windows)."""
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        return ctypes.CDLL(name).malloc_trim
    except (OSError, AttributeError):
        return None


def release() -> bool:
    """Return the free pages of every malloc arena to the system; whether the C library could."""
    trim = _malloc_trim()
    if trim is None:
        return False
    trim(0)
    return True
