"""Planning's pools keep numpy's BLAS to one thread while they are open, and give it back after."""

from __future__ import annotations

import numpy as np
from qexport.passes.pool import planning_pool
from threadpoolctl import threadpool_info


def _blas_threads() -> list[int]:
    return [int(lib["num_threads"]) for lib in threadpool_info() if lib["user_api"] == "blas"]


def test_planning_pool_runs_blas_on_one_thread_and_restores_it() -> None:
    np.ones((2, 2)) @ np.ones((2, 2))  # numpy's BLAS loaded
    before = _blas_threads()
    assert before, "numpy's BLAS not found by threadpoolctl"
    with planning_pool(2, "test") as pool:
        assert _blas_threads() == [1] * len(before)
        inside = list(pool.map(lambda _: _blas_threads(), range(2)))
        assert inside == [[1] * len(before)] * 2
        a = np.random.default_rng(0).standard_normal((64, 64))
        assert np.array_equal(pool.submit(lambda: a @ a).result(), a @ a)
    assert _blas_threads() == before
