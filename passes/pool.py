"""The thread pools planning runs its numpy work in, with numpy's BLAS kept to one thread each.

Planning's threads call BLAS themselves (a channel shift's bias z·Ŵ per linear, the MSE clip's
products): with OpenBLAS's own threads on top, N planning threads start N × OMP_NUM_THREADS
threads that spin on the same cores. One BLAS thread per caller gives the same results (each
output of a product is summed by one thread in either case) in a fraction of the time:
docs/benchmarks.md (the best recipe's fifth run on the GPU machine).

The threads make and drop float64 weights in malloc arenas of their own (glibc: up to 8 per core),
which keep the freed pages; when a pool closes they are handed back (qexport.heap).
"""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

from threadpoolctl import threadpool_limits

from qexport import heap


@contextmanager
def planning_pool(workers: int, name: str) -> Iterator[ThreadPoolExecutor]:
    """A pool of `workers` threads; while it is open, numpy's BLAS runs one thread per call; once it
    has closed, the heap pages its threads freed go back to the system."""
    try:
        with threadpool_limits(limits=1, user_api="blas"), ThreadPoolExecutor(workers, thread_name_prefix=name) as pool:
            yield pool
    finally:
        heap.release()
