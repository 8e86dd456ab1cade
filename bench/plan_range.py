"""One range's plan (plan_range) timed two ways, alternately in one process: the smoothing of each
weight applied when the thread that quantizes it makes it (qexport's way), and applied at once by
the thread planning the groups (how planning worked before). Prints the wall and the planning
thread's own CPU time: on a machine with more cores than PLAN_THREADS' work needs, the planning
thread is what a range waits for.

    python bench/plan_range.py --stats dxl2.qstats --repeats 3

The statistics may be of any built-in model; the plan is the w8a8-tsq-tsw recipe with the
channel shift, for the first calibrated step.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
from qexport.calib.store import load
from qexport.exporter.build import BuildConfig, range_inputs
from qexport.exporter.fp_export import StepGraphs, export_fp, load_graph, prepare
from qexport.passes.plan import plan_range
from qexport.passes.rangeplan import FinalWeights
from qexport.targets.catalog import ORT_CPU

from qexport.models.registry import load_model
from qexport.recipe import load_recipe, with_settings


def _at_once_rows(self: FinalWeights, layer: str, s: np.ndarray) -> None:
    self[layer] *= s[:, None]


def _at_once_columns(self: FinalWeights, layer: str, s: np.ndarray) -> None:
    self[layer] /= s[None, :]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--stats", type=Path, required=True, help="a .qstats of a built-in model")
    parser.add_argument("--repeats", type=int, default=3)
    a = parser.parse_args()
    stats = load(a.stats)
    adapter = load_model(stats.header["model_id"])
    fp = prepare(export_fp(adapter, list(stats.layers)))
    graph = StepGraphs(load_graph(fp)).at(int(stats.header["timesteps"][0]))
    _, groups, weights, biases = range_inputs(graph, fp.bindings, adapter)
    quant = BuildConfig(recipe=with_settings(load_recipe("w8a8-tsq-tsw"), ["channel_shift=on"])).quant
    ways = {"when made": (FinalWeights.scale_rows, FinalWeights.divide_columns),
            "at once": (_at_once_rows, _at_once_columns)}  # fmt: skip
    print(f"{stats.header['model_id']}: {len(weights)} linears, one range")
    print(f"{'smoothing applied':<18} {'wall s':>8} {'planning thread CPU s':>22} {'all threads CPU s':>15}")
    try:
        for _ in range(a.repeats):
            for name, (rows, columns) in ways.items():
                FinalWeights.scale_rows, FinalWeights.divide_columns = rows, columns  # type: ignore[method-assign]
                start, cpu, total = time.perf_counter(), time.thread_time(), time.process_time()
                plan_range([0], groups, stats.layers, weights, biases, quant, ORT_CPU)
                took = time.perf_counter() - start, time.thread_time() - cpu, time.process_time() - total
                print(f"{name:<18} {took[0]:>8.2f} {took[1]:>22.2f} {took[2]:>15.2f}", flush=True)
    finally:
        FinalWeights.scale_rows, FinalWeights.divide_columns = ways["when made"]  # type: ignore[method-assign]


if __name__ == "__main__":
    main()
