"""Per-layer output SQNR of the weight rounding, side by side: nearest vs GPTQ with several
dampings, with and without act-order, on the replayed calibration prompts (where H comes from)
and on held-out prompts. SQNR of a layer = ||X·W||² / ||X·(W − Q(W))||² with X/s as planned.

    python bench/gptq_layer_error.py calib.qstats held_out.txt [--w-bits 4]
"""

from __future__ import annotations

import argparse
import functools
from pathlib import Path

import numpy as np
from qexport.calib.store import load
from qexport.exporter.build import _range_graphs, range_inputs
from qexport.exporter.replay import PROMPTS, CalibrationReplay
from qexport.passes import gptq, plan
from qexport.passes import weights as weight_rounding
from qexport.passes.plan import QuantConfig, Smooth, plan_range
from qexport.targets.catalog import ORT_CPU

from qexport.models.registry import load_model


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("stats", type=Path)
    parser.add_argument("held_out", type=Path, help="prompts file (its first 2 prompts are replayed)")
    parser.add_argument("--w-bits", type=int, default=4)
    args = parser.parse_args()
    stats = load(args.stats)
    adapter = load_model(stats.model_id)
    bindings, _, graph_of, _ = _range_graphs(adapter, stats, per_step=False)
    _, groups, weights, biases = range_inputs(graph_of([0]), bindings, adapter)
    steps, firsts, h = list(range(stats.steps)), [g.layers[0] for g in groups], stats.header
    replay = functools.partial(CalibrationReplay, adapter, timesteps=h["timesteps"], cfg=h["cfg"])
    calib = replay(h["prompt_texts"][:PROMPTS]).input_grams(steps, firsts)
    held_out = replay(args.held_out.read_text().splitlines()[:PROMPTS]).input_grams(steps, firsts)

    def sqnr(p: plan.RangePlan, grams: dict[str, np.ndarray]) -> tuple[float, float]:
        values = []
        for g in groups:
            for layer in g.layers:
                hessian = gptq.input_hessian(grams[g.layers[0]], p.smooth.get(g.tensor, 1.0))
                w = p.layers[layer].w_float.astype(np.float64)
                e = w - p.layers[layer].weight()
                values.append(10 * np.log10(np.trace(w.T @ hessian @ w) / np.trace(e.T @ hessian @ e)))
        return float(np.mean(values)), float(np.min(values))

    print(f"W{args.w_bits}, ASQ, one range; per-layer output SQNR dB (mean / worst layer)")
    print(f"{'rounding':<32}{'calibration':>16}{'held-out':>16}")
    variants = [("nearest", None, None)] + [
        (f"gptq damp {d:g}{' act-order' if ao else ''}", d, ao) for d in (0.001, 0.01, 0.1) for ao in (True, False)
    ]
    for name, damp, act_order in variants:
        rounding = gptq.Rounding.NEAREST if damp is None else gptq.Rounding.GPTQ
        if damp is not None:  # the solve planning calls, with this variant's settings
            solve = functools.partial(gptq.gptq_quantize_many, damp=damp, act_order=act_order)
            weight_rounding.gptq_quantize_many = solve
        config = QuantConfig(w_bits=args.w_bits, smooth=Smooth.ASQ, weight_rounding=rounding)
        p = plan_range(steps, groups, stats.layers, weights, biases, config, ORT_CPU, keep_float=True, grams=calib)
        (c_mean, c_min), (t_mean, t_min) = sqnr(p, calib), sqnr(p, held_out)
        print(f"{name:<32}{c_mean:>9.2f} / {c_min:<5.1f}{t_mean:>9.2f} / {t_min:<5.1f}")


if __name__ == "__main__":
    main()
