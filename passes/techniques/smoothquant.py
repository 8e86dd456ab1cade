"""SmoothQuant: s_j = max|X_j|^α / max|W_j|^(1−α) per input channel, folded into the producer.
ASQ: one s for all steps (aggregated statistics); TSQ: one s per time range (per model)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import numpy as np
import onnx_graphsurgeon as gs
from qexport.passes.graph import const, consumers, node_named, write_bias
from qexport.passes.rangeplan import GroupStep, Smooth
from qexport.passes.rewrite import PassConfig
from qexport.passes.sink import sink_smoothing
from qexport.passes.smoothing import salience_calibrated, smoothing_vector
from qexport.passes.techniques.base import GraphPass, Shape, Technique
from qexport.targets.profile import TargetProfile

from qexport.errors import QexportError


def fold_smoothing(graph: gs.Graph, config: PassConfig, target: TargetProfile) -> gs.Graph:
    """Fold 1/s into modulation constants or the value projection; else insert a per-channel Mul."""
    cons = consumers(graph)
    constants = {t.name: t for t in graph.tensors().values() if isinstance(t, gs.Constant)}
    for g in config.groups:
        s = config.plan.smooth.get(g.tensor)
        if s is None:
            continue
        if g.fold == "modulation" and g.scale_const and g.shift_const:
            for name in (g.scale_const, g.shift_const):
                c = constants[name]
                c.values = (np.asarray(c.values, dtype=np.float64) / s).astype(np.float32)
        elif g.fold == "value" and g.value_layer:
            bias = config.plan.layers[g.value_layer].bias
            if bias is not None:
                write_bias(graph, config.nodes[g.value_layer], bias, cons)
        else:
            x = graph.tensors()[g.tensor]
            y = gs.Variable(f"{g.tensor}::smoothed", dtype=np.float32)
            inv = const(f"{g.tensor}::inv_s", (1.0 / s).astype(np.float32))
            mul = gs.Node("Mul", f"{g.tensor}::smooth", inputs=[x, inv], outputs=[y])
            graph.nodes.append(mul)
            for layer in g.layers:
                node_named(graph, config.nodes[layer]).inputs[0] = y
    return graph


@dataclass(frozen=True, kw_only=True)
class SmoothQuant(Technique):
    kind = "smoothquant"
    summary = "migrate activation outliers into the weights: ASQ (one s for all steps) or TSQ (one per model)"
    rewrites: ClassVar[Mapping[str, GraphPass]] = {"fold": fold_smoothing, "sink": sink_smoothing}

    mode: Literal["asq", "tsq"]
    alpha: float | Literal["auto", "layer"] = 0.5  # auto: searched per range (ASQ: one for all); layer: per group
    # ASQ's per-channel aggregate over the steps; spearman: PTQ4DiT's salience calibration (passes.smoothing)
    statistic: Literal["ema", "max", "range", "spearman"] = "ema"
    shared_ranges: int = 0  # TSQ per step: one s per this many contiguous step ranges (0 = per model)

    def replays(self) -> bool:
        return self.alpha in ("auto", "layer")

    def check(self, shape: Shape) -> None:
        super().check(shape)
        if isinstance(self.alpha, float) and not 0.0 < self.alpha <= 1.0:
            raise QexportError(f"recipe key 'smoothquant.alpha' must be in (0, 1], 'auto' or 'layer', got {self.alpha}")
        if self.statistic != "ema" and self.mode != "asq":
            raise QexportError(f"recipe key 'smoothquant.statistic' {self.statistic!r} is ASQ's; it needs mode 'asq'")
        if self.shared_ranges < 0:
            raise QexportError(
                f"recipe key 'smoothquant.shared_ranges' must be 0 (off) or more, got {self.shared_ranges}"
            )
        if self.shared_ranges and (self.mode != "tsq" or not isinstance(self.alpha, float) or not shape.per_step):
            raise QexportError(
                "recipe key 'smoothquant.shared_ranges' gives TSQ one smoothing vector per K step ranges; it needs "
                "mode 'tsq', a fixed alpha and one model per step (time_ranges null)"
            )

    def settings(self) -> dict[str, Any]:
        fixed = isinstance(self.alpha, float)
        return {"smooth": self.mode, "alpha": self.alpha if fixed else 0.5, "alpha_auto": self.alpha == "auto",
                "alpha_layer": self.alpha == "layer", "asq_stat": self.statistic,
                "smooth_ranges": self.shared_ranges}  # fmt: skip

    @classmethod
    def plan_fold(cls, step: GroupStep) -> None:
        """s from the group's activation statistic and the largest |W| per input channel over its
        linears: W <- diag(s)·W for each, and 1/s folded into the value projection where the group
        is an attention output (else the graph divides the input, explicitly or in the modulation)."""
        rng, g = step.rng, step.g
        if rng.config.smooth == Smooth.NONE:
            return
        wmax = np.max([rng.weights.row_abs_max(layer) for layer in g.layers], axis=0)
        if rng.config.smooth == Smooth.ASQ and rng.config.asq_stat == "spearman":
            step.act = salience_calibrated(step.stats, list(range(step.stats.steps)), wmax)
        s = smoothing_vector(step.act, wmax, rng.plan.group_alpha.get(g.tensor, rng.config.alpha))
        step.s = rng.plan.smooth[g.tensor] = s
        rng.plan.folds[g.fold] = rng.plan.folds.get(g.fold, 0) + 1
        for layer in g.layers:  # in place, or when the weight is made (FinalWeights)
            rng.final_w.scale_rows(layer, s)
        if g.fold == "value" and g.value_layer is not None:
            rng.final_w.divide_columns(g.value_layer, s)
            rng.plan.value_folds.add(g.value_layer)
            bias = rng.final_b[g.value_layer]
            if bias is not None:
                rng.final_b[g.value_layer] = bias / s
                rng.changed_bias.add(g.value_layer)
