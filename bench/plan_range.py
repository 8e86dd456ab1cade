"""One range's plan (plan_range) timed two ways, alternately in one process.

--compare smoothing (the default): the smoothing of each weight applied when the thread that
quantizes it makes it (qexport's way), and applied at once by the thread planning the groups (how
planning worked before). --compare blas: numpy's BLAS kept to one thread while planning's pools
run (qexport's way, passes.pool), and left to its own threads (OMP_NUM_THREADS each, how planning
worked before); --threads sets the planning threads (PLAN_THREADS) for both. Prints the wall and
the planning thread's own CPU time: on a machine with more cores than PLAN_THREADS' work needs,
the planning thread is what a range waits for.

    python bench/plan_range.py --stats dxl2.qstats --repeats 3
    OMP_NUM_THREADS=8 python bench/plan_range.py --stats dxl2.qstats --compare blas --threads 8

The statistics may be of any built-in model; the plan is the w8a8-tsq-tsw recipe with the
channel shift, for the first calibrated step.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import numpy as np
from qexport.calib.store import load
from qexport.exporter.build import BuildConfig, range_inputs
from qexport.exporter.fp_export import StepGraphs, export_fp, load_graph, prepare
from qexport.passes import plan, weights
from qexport.passes.plan import plan_range
from qexport.passes.pool import planning_pool
from qexport.passes.rangeplan import FinalWeights
from qexport.targets.catalog import ORT_CPU

from qexport.models.registry import load_model
from qexport.recipe import load_recipe, with_settings


def _at_once_rows(self: FinalWeights, layer: str, s: np.ndarray) -> None:
    self[layer] *= s[:, None]


def _at_once_columns(self: FinalWeights, layer: str, s: np.ndarray) -> None:
    self[layer] /= s[None, :]


@contextmanager
def _own_blas_threads(workers: int, name: str) -> Iterator[ThreadPoolExecutor]:
    with ThreadPoolExecutor(workers, thread_name_prefix=name) as pool:
        yield pool


def _pools(pool: Callable[[int, str], object]) -> Callable[[], None]:
    """Planning's and GPTQ's pools made by `pool`, when called."""

    def chosen() -> None:
        plan.planning_pool = weights.planning_pool = pool  # type: ignore[assignment]

    return chosen


def _smoothing(rows: Callable[..., None], columns: Callable[..., None]) -> Callable[[], None]:
    """FinalWeights' smoothing done by `rows` and `columns`, when called."""

    def chosen() -> None:
        FinalWeights.scale_rows, FinalWeights.divide_columns = rows, columns  # type: ignore[method-assign]

    return chosen


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--stats", type=Path, required=True, help="a .qstats of a built-in model")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--compare", choices=("smoothing", "blas"), default="smoothing")
    parser.add_argument("--threads", type=int, help="planning threads (PLAN_THREADS; default: as qexport sets them)")
    a = parser.parse_args()
    plan.PLAN_THREADS = a.threads or plan.PLAN_THREADS
    stats = load(a.stats)
    adapter = load_model(stats.header["model_id"])
    fp = prepare(export_fp(adapter, list(stats.layers)))
    graph = StepGraphs(load_graph(fp)).at(int(stats.header["timesteps"][0]))
    _, groups, weights, biases = range_inputs(graph, fp.bindings, adapter)
    quant = BuildConfig(recipe=with_settings(load_recipe("w8a8-tsq-tsw"), ["channel_shift=on"])).quant
    qexports = _smoothing(FinalWeights.scale_rows, FinalWeights.divide_columns)
    ways = (
        {"when made": qexports, "at once": _smoothing(_at_once_rows, _at_once_columns)}
        if a.compare == "smoothing"
        else {"one a planner": _pools(planning_pool), "its own threads": _pools(_own_blas_threads)}
    )
    print(f"{stats.header['model_id']}: {len(weights)} linears, one range, {plan.PLAN_THREADS} planning threads")
    label = "smoothing applied" if a.compare == "smoothing" else "BLAS threads"
    print(f"{label:<18} {'wall s':>8} {'planning thread CPU s':>22} {'all threads CPU s':>15}")
    try:
        for _ in range(a.repeats):
            for name, chosen in ways.items():
                chosen()
                start, cpu, total = time.perf_counter(), time.thread_time(), time.process_time()
                plan_range([0], groups, stats.layers, weights, biases, quant, ORT_CPU)
                took = time.perf_counter() - start, time.thread_time() - cpu, time.process_time() - total
                print(f"{name:<18} {took[0]:>8.2f} {took[1]:>22.2f} {took[2]:>15.2f}", flush=True)
    finally:
        qexports()
        _pools(planning_pool)()


if __name__ == "__main__":
    main()
