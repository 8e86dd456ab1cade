"""The thread pools planning runs its numpy work in, with numpy's BLAS kept to one thread each.

Planning's threads call BLAS themselves (a channel shift's bias z·Ŵ per linear, the MSE clip's
products): with OpenBLAS's own threads on top, N planning threads start N × OMP_NUM_THREADS
threads that spin on the same cores. One BLAS thread per caller gives the same results (each
output of a product is summed by one thread in either case) in a fraction of the time:
docs/benchmarks.md (the best recipe's fifth run on the GPU machine).
"""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

from threadpoolctl import threadpool_limits


@contextmanager
def planning_pool(workers: int, name: str) -> Iterator[ThreadPoolExecutor]:
    """A pool of `workers` threads; while it is open, numpy's BLAS runs one thread per call."""
    with threadpool_limits(limits=1, user_api="blas"), ThreadPoolExecutor(workers, thread_name_prefix=name) as pool:
        yield pool
