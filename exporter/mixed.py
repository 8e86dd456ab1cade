"""``--mixed-precision``: per-layer weight widths (the low ``--w-bits`` or 8) under a size budget.

Each quantized linear's sensitivity is measured end to end on the calibration replay: the
relative error power of the denoiser output (torch simulation vs FP) added when that linear alone
is at the low width and every other one at 8 bits. A greedy knapsack then raises layers to 8 bits
in order of sensitivity per byte raised, while the budget holds. The build plans with the result."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
from qexport.exporter.replay import CalibrationReplay
from qexport.exporter.simulate import simulated
from qexport.passes.plan import MIXED_HIGH_BITS, RangePlan
from qexport.passes.quant import STORAGE
from qexport.targets.profile import TargetProfile

from qexport.progress import Progress, report

STEPS = 4  # replayed steps the sensitivities are measured on in all (at least one per allocation)

MakePlan = Callable[[int, dict[str, int] | None], RangePlan]  # (range index, layer bits) -> plan


@dataclass(kw_only=True)
class Allocation:
    """The weight width of every quantized linear of one model, and why."""

    bits: dict[str, int]  # layer -> weight bits
    sensitivity: dict[str, float]  # layer -> relative output error power added at the low width
    steps: list[int]  # the replayed steps the sensitivities were measured on
    base_error: float  # relative output error power with every layer at 8 bits


def storage_bits(bits: int, target: TargetProfile) -> int:
    """Bits one weight takes in the storage type of `bits` (int4: 4, int8: 8)."""
    lo, hi = STORAGE[target.weight_type(bits)][1:]
    return int(np.log2(hi - lo + 1))


def weight_bytes(params: dict[str, int], bits: dict[str, int], target: TargetProfile) -> int:
    """Bytes of the integer weights (4-bit ones packed two per byte; scales and zero points not counted)."""
    return sum(-(-n * storage_bits(bits[layer], target) // 8) for layer, n in params.items())


def allocate(
    sensitivity: dict[str, float], params: dict[str, int], low: int, budget: float, target: TargetProfile
) -> dict[str, int]:
    """Layer -> bits: every layer at `low`, then layers raised to 8 bits by decreasing sensitivity per
    byte raised (first listed wins ties), skipping a layer that no longer fits, while the weights'
    storage stays within `budget` bits per parameter.

    A budget that all-low storage already exceeds leaves every layer at `low`."""
    bits = dict.fromkeys(params, low)
    limit = budget * sum(params.values())
    used = sum(n * storage_bits(low, target) for n in params.values())
    step = storage_bits(MIXED_HIGH_BITS, target) - storage_bits(low, target)
    order = list(params)
    for layer in sorted(order, key=lambda k: (-sensitivity[k] / max(params[k], 1), order.index(k))):
        extra = params[layer] * step
        if used + extra <= limit:
            bits[layer] = MIXED_HIGH_BITS
            used += extra
    return bits


def relative_error(replay: CalibrationReplay, plan: RangePlan, steps: list[int]) -> float:
    """Mean over steps of |simulated - FP|^2 / |FP|^2 of the denoiser output."""
    errors = []
    with simulated(replay.adapter.transformer, plan):
        for k in steps:
            ref = replay.reference(k).astype(np.float64)
            errors.append(float(np.square(replay.run(k) - ref).sum() / max(float(np.square(ref).sum()), 1e-30)))
    return float(np.mean(errors))


def spread(values: list[int], count: int) -> list[int]:
    """At most `count` evenly spaced entries of `values`, first and last included."""
    if len(values) <= count:
        return list(values)
    return [values[int(i)] for i in np.unique(np.round(np.linspace(0, len(values) - 1, max(count, 1))))]


def sensitivities(
    replay: CalibrationReplay, units: list[tuple[int, list[int]]], make: MakePlan, low: int
) -> tuple[dict[str, float], float]:
    """Layer -> added error power at the low width, averaged over units (range index, replayed steps
    of that range), and the all-8-bit error; each unit's plans come from make."""
    added: dict[str, list[float]] = {}
    bases = []
    for index, steps in units:
        low_plan = make(index, None)
        high_plan = make(index, dict.fromkeys(low_plan.layers, MIXED_HIGH_BITS))
        base = relative_error(replay, high_plan, steps)
        bases.append(base)
        for layer, lp in low_plan.layers.items():
            one = replace(high_plan, layers={**high_plan.layers, layer: lp})
            added.setdefault(layer, []).append(relative_error(replay, one, steps) - base)
    return {layer: float(np.mean(v)) for layer, v in added.items()}, float(np.mean(bases))


def choose_bits(
    replay: CalibrationReplay,
    ranges: list[list[int]],
    shared: bool,
    make: MakePlan,
    params: dict[str, int],
    low: int,
    budget: float,
    target: TargetProfile,
    progress: Progress | None = None,
) -> list[Allocation]:
    """One allocation per range (shared: the same one for every range, from sensitivities averaged
    over STEPS steps spread across all ranges, each simulated with its range's plan)."""
    if shared:
        picked = set(spread(sorted(k for steps in ranges for k in steps), STEPS))
        groups = [[(i, [k for k in steps if k in picked]) for i, steps in enumerate(ranges)]]
        groups = [[u for u in groups[0] if u[1]]]
    else:
        each = max(1, STEPS // len(ranges))
        groups = [[(i, spread(steps, each))] for i, steps in enumerate(ranges)]
    found = []
    for n, units in enumerate(groups):
        sens, base = sensitivities(replay, units, make, low)
        bits = allocate(sens, params, low, budget, target)
        found.append(Allocation(bits=bits, sensitivity=sens, steps=[k for _, s in units for k in s], base_error=base))
        report(progress, "mixed precision (allocations)", n + 1, len(groups))
    return found * len(ranges) if shared else found


def raised(plan: RangePlan, low: int) -> list[str]:
    """The layers of a plan whose weights are wider than `low` (what the manifest records per range)."""
    return [layer for layer, lp in plan.layers.items() if lp.w_grid.bits != low]


def mixed_manifest(
    ranges: list[tuple[int, RangePlan, Allocation | None]], low: int, budget: float, target: TargetProfile
) -> dict[str, Any]:
    """quantization.mixed_precision of the manifest, from each range's (index, plan, measured
    allocation): the rule, per range the layers per width and the weight bytes against all-low and
    all-high, and each distinct measured allocation."""
    params = {layer: int(np.prod(lp.shape)) for layer, lp in ranges[0][1].layers.items()}
    rows = []
    for _, plan, _ in ranges:
        bits = {layer: lp.w_grid.bits for layer, lp in plan.layers.items()}
        counts = {str(b): sum(1 for v in bits.values() if v == b) for b in sorted(set(bits.values()))}
        rows.append({"layers_at": counts, "weight_bytes": weight_bytes(params, bits, target)})
    measured: list[dict[str, Any]] = []
    seen: list[Allocation] = []
    for _, _, mixed in ranges:
        if mixed is not None and all(mixed is not a for a in seen):
            seen.append(mixed)
            sens = {k: float(f"{v:.4g}") for k, v in mixed.sensitivity.items()}
            measured.append({"ranges": [i for i, _, m in ranges if m is mixed], "steps": mixed.steps,
                             "base_error": float(f"{mixed.base_error:.4g}"), "sensitivity": sens})  # fmt: skip
    return {
        "budget_bits_per_weight": budget,
        "widths": [low, MIXED_HIGH_BITS],
        "rule": "greedy by measured denoiser-output error added at the low width, per byte raised",
        "ranges": rows,
        "all_low_bytes": weight_bytes(params, dict.fromkeys(params, low), target),
        "all_high_bytes": weight_bytes(params, dict.fromkeys(params, MIXED_HIGH_BITS), target),
        "measured": measured,
    }
