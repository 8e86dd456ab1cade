"""How much of each linear's weight-quantization error a rank-r branch can remove: the d-weighted
error norm left after the best rank r (the branch's own objective), on the real ASQ plans of a
calibration, averaged over the quantized linears.

    python bench/lowrank_energy.py calib.qstats
"""

from __future__ import annotations

import sys

import numpy as np
from qexport.calib.store import load
from qexport.exporter.build import range_inputs
from qexport.exporter.fp_export import export_fp, load_graph, prepare
from qexport.passes.plan import QuantConfig, Smooth, plan_range
from qexport.targets.catalog import ORT_CPU

from qexport.models.registry import load_model

RANKS = (4, 16, 32)


def main() -> None:
    stats = load(sys.argv[1])
    adapter = load_model(stats.model_id)
    fp = prepare(export_fp(adapter, list(stats.layers)))
    _, groups, weights, biases = range_inputs(load_graph(fp), fp.bindings, adapter)
    steps = list(range(stats.steps))
    for bits in (4, 8):
        quant = QuantConfig(w_bits=bits, smooth=Smooth.ASQ)
        plan = plan_range(steps, groups, stats.layers, weights, biases, quant, ORT_CPU, keep_float=True)
        s_of = {layer: plan.smooth[g.tensor] for g in groups for layer in g.layers}
        left: dict[int, list[float]] = {r: [] for r in RANKS}
        for name, lp in plan.layers.items():
            assert lp.w_float is not None
            err = lp.w_float.astype(np.float64) - lp.weight()
            sv = np.linalg.svd((stats.layers[name].asq / s_of[name])[:, None] * err, compute_uv=False)
            for r in RANKS:
                left[r].append(float(np.sqrt(1 - (sv[:r] ** 2).sum() / (sv**2).sum())))
        cells = ", ".join(f"r={r}: {np.mean(v):.3f} ({-20 * np.log10(np.mean(v)):.2f} dB)" for r, v in left.items())
        print(f"W{bits}A8 ASQ, d-weighted weight error left (mean over {len(plan.layers)} linears): {cells}")


if __name__ == "__main__":
    main()
