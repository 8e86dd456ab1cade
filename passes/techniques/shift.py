"""Channel shift: before the per-tensor quantizer, subtract from each input channel the midpoint z_j
of its calibrated range, so every channel is centred on zero and the one tensor-wide range only
has to cover the widest channel's half-width. The linear's output is restored exactly by its
bias: (x - z)·W + (b + z·W) = x·W + b.

z is computed per range from the statistics' per-channel extremes (after smoothing), so with one
model per step every step has its own z while the weights stay shared: only biases and the
per-step modulation constants differ. Where z goes in the graph:

- modulation groups (q/k/v, fc1 of a per-step model): subtracted from the constant adaLN shift;
- attention-output groups: subtracted from the value projection's bias (each softmax row sums to
  one, so attn·(V - z) = attn·V - z);
- anything else: an explicit ``Add(x, -z)`` before the quantizer.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
import onnx_graphsurgeon as gs
from qexport.calib.stats import LayerStats
from qexport.passes.analyze import Group
from qexport.passes.graph import consumers, node_named, write_bias
from qexport.passes.rangeplan import GroupStep, LayerStep, QuantConfig, RangePlan
from qexport.passes.rewrite import PassConfig
from qexport.passes.techniques.base import GraphPass, Technique
from qexport.targets.profile import TargetProfile


@dataclass(kw_only=True)
class Shifts:
    """What the shift planned for one range."""

    z: dict[str, np.ndarray] = field(default_factory=dict)  # group tensor -> z
    folds: dict[str, int] = field(default_factory=dict)  # where z goes -> groups
    layers: dict[str, np.ndarray] = field(default_factory=dict)  # layer -> the z subtracted from its input
    in_value: set[str] = field(default_factory=set)  # layers whose z is in the value projection's bias


def _extremes(stats: LayerStats, steps: list[int], divisor: np.ndarray | float) -> tuple[np.ndarray, np.ndarray]:
    """Each channel's (min [C], max [C]) over the steps, in the smoothed domain X / s."""
    return (stats.channel_min[steps] / divisor).min(axis=0), (stats.channel_max[steps] / divisor).max(axis=0)


def channel_shift(stats: LayerStats, steps: list[int], divisor: np.ndarray | float) -> np.ndarray:
    """z [C]: the midpoint of each channel's range over the steps, in the smoothed domain X / s."""
    lo, hi = (v.astype(np.float64) for v in _extremes(stats, steps, divisor))
    return np.where(np.isfinite(lo) & np.isfinite(hi), (lo + hi) / 2.0, 0.0)


def shifted_range(
    stats: LayerStats, steps: list[int], divisor: np.ndarray | float, z: np.ndarray
) -> tuple[float, float]:
    """The per-tensor (min, max) of X / s - z over the steps, from the per-channel extremes."""
    lo, hi = _extremes(stats, steps, divisor)
    return float((lo - z).min()), float((hi - z).max())


def can_shift(g: Group, biases: Mapping[str, np.ndarray | None]) -> bool:
    """A group is shifted only where every restoring bias exists (and, for an attention-output
    group, the value projection's bias that takes z)."""
    if any(biases.get(layer) is None for layer in g.layers):
        return False
    return g.fold != "value" or (g.value_layer is not None and biases.get(g.value_layer) is not None)


def shift_fold(g: Group) -> str:
    """Where a group's z goes: "modulation" (the constant adaLN shift), "value" (the value bias) or
    "explicit" (an Add before the quantizer)."""
    if g.fold == "modulation" and g.scale_const and g.shift_const:
        return "modulation"
    return "value" if g.fold == "value" else "explicit"


def shifts_of(plan: RangePlan) -> Shifts:
    """The range's shifts (empty where the build has none)."""
    found = plan.parts.get(ChannelShift.kind)
    return found if isinstance(found, Shifts) else Shifts()


def insert_shift(graph: gs.Graph, config: PassConfig, target: TargetProfile) -> gs.Graph:
    """Put each shifted group's z where it folds (see the module doc) and write the restoring biases."""
    plan, shifts = config.plan, shifts_of(config.plan)
    if not shifts.z:
        return graph
    constants = {t.name: t for t in graph.tensors().values() if isinstance(t, gs.Constant)}
    for g in config.groups:
        z = shifts.z.get(g.tensor)
        kind = None if z is None else shift_fold(g)
        if z is None or kind == "value":  # value: already in the value projection's bias
            continue
        if kind == "modulation" and g.shift_const:
            const = constants[g.shift_const]
            values = np.asarray(const.values, dtype=np.float64)
            const.values = (values - z).astype(np.float32)  # broadcasts over the last (channel) axis
            continue
        x = node_named(graph, config.nodes[g.layers[0]]).inputs[0]
        y = gs.Variable(f"{g.tensor}::shifted", dtype=np.float32)
        minus_z = gs.Constant(f"{g.tensor}::minus_z", np.ascontiguousarray(-z, dtype=np.float32))
        graph.nodes.append(gs.Node("Add", f"{g.tensor}::shift", inputs=[x, minus_z], outputs=[y]))
        for layer in g.layers:
            node_named(graph, config.nodes[layer]).inputs[0] = y
    cons = consumers(graph)
    for layer, lp in plan.layers.items():
        if lp.bias is not None and not write_bias(graph, config.nodes[layer], lp.bias, cons):
            raise ValueError(f"{layer} has a planned bias but no bias Add in the graph")
    return graph


@dataclass(frozen=True, kw_only=True)
class ChannelShift(Technique):
    kind = "channel_shift"
    summary = "centre each input channel per range before the quantizer; restored exactly by the bias"
    excludes = ("head_rotation", "online_rotation", "lowrank", "attention")
    rewrites: ClassVar[Mapping[str, GraphPass]] = {"shift": insert_shift}

    @classmethod
    def plan_group(cls, step: GroupStep) -> None:
        rng, g = step.rng, step.g
        if not rng.config.has(cls.kind) or not can_shift(g, rng.final_b):
            return
        shifts = rng.plan.parts.setdefault(cls.kind, Shifts())
        z = channel_shift(step.stats, rng.plan.steps, step.divisor)
        step.set_range(*shifted_range(step.stats, rng.plan.steps, step.divisor, z))
        step.subtract = shifts.z[g.tensor] = z
        kind = shift_fold(g)
        shifts.folds[kind] = shifts.folds.get(kind, 0) + 1
        shifts.layers.update(dict.fromkeys(g.layers, z))
        if kind == "value" and g.value_layer is not None:  # attn·(V - z) = attn·V - z
            rng.add_bias(g.value_layer, -z)
            rng.plan.value_folds.add(g.value_layer)
            shifts.in_value.update(g.layers)

    @classmethod
    def plan_layer(cls, step: LayerStep) -> None:
        shifts = shifts_of(step.rng.plan)
        z = shifts.layers.get(step.layer)
        if z is None:
            return
        # (x - z)·Ŵ + (b + z·Ŵ) = x·Ŵ + b; Ŵ widened first: numpy multiplies mixed types without BLAS, ~3x slower
        step.rng.add_bias(step.layer, z @ step.lp.weight().astype(np.float64))
        if step.layer not in shifts.in_value:
            step.lp.subtract = z.astype(np.float32)

    @classmethod
    def record(cls, config: QuantConfig, plans: list[RangePlan]) -> dict[str, Any]:
        folds = shifts_of(plans[0]).folds
        return {cls.kind: {"on": config.has(cls.kind), "folds": dict(sorted(folds.items()))}}

    @classmethod
    def describe(cls, quantization: Mapping[str, Any]) -> list[str]:
        shift = quantization.get(cls.kind, {})
        if not shift.get("on"):
            return []
        folds = ", ".join(f"{k} {v}" for k, v in shift["folds"].items()) or "none (no group has the biases it needs)"
        return [
            f"  shift      channel shift per range, groups: {folds} (restored by per-range biases; weights unchanged)"
        ]
