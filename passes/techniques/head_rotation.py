"""A per-head Hadamard rotation folded into the value projections and attention outputs."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import onnx_graphsurgeon as gs
from qexport.passes.analyze import Group
from qexport.passes.graph import consumers, write_bias
from qexport.passes.rangeplan import GroupStep, QuantConfig
from qexport.passes.rewrite import PassConfig
from qexport.passes.rotate import head_rotation, rotated_range
from qexport.passes.techniques.base import GraphPass, Technique
from qexport.targets.profile import TargetProfile

from qexport.errors import QexportError


def fold_rotation(graph: gs.Graph, config: PassConfig, target: TargetProfile) -> gs.Graph:
    """Rotated attention-output groups: the value projection's bias becomes b_v·R (its weights and
    the output linear's come rotated from the plan through quantize_weights)."""
    cons = consumers(graph)
    for g in config.groups:
        if g.tensor in config.plan.rotations and g.value_layer:
            bias = config.plan.layers[g.value_layer].bias
            if bias is not None:
                write_bias(graph, config.nodes[g.value_layer], bias, cons)
    return graph


def fold_head_rotation(
    g: Group,
    head_dims: dict[str, int],
    final_w: dict[str, np.ndarray],
    final_b: dict[str, np.ndarray | None],
    changed_bias: set[str],
) -> np.ndarray:
    """Fold a per-head Hadamard R around an attention-output group: W_v <- W_v·R, b_v <- b_v·R,
    W_out <- R^T·W_out (W^T [in, out] layout); returns R."""
    assert g.value_layer is not None
    if g.layers[0] not in head_dims:
        raise QexportError(f"head_rotation needs the head size of {g.layers[0]}'s attention")
    rot = head_rotation(g.channels, head_dims[g.layers[0]])
    for layer in g.layers:
        final_w[layer] = rot.T @ final_w[layer]
    final_w[g.value_layer] = final_w[g.value_layer] @ rot
    bias = final_b[g.value_layer]
    if bias is not None:
        final_b[g.value_layer] = bias @ rot
        changed_bias.add(g.value_layer)
    return rot


@dataclass(frozen=True, kw_only=True)
class HeadRotation(Technique):
    kind = "head_rotation"
    summary = "per-head Hadamard folded around attention (value projection and output), exact"
    rewrites: ClassVar[Mapping[str, GraphPass]] = {"fold": fold_rotation}

    def replays(self) -> bool:
        return True

    def settings(self) -> dict[str, Any]:
        return {"rotate": True}

    @classmethod
    def wants_samples(cls, config: QuantConfig, fold: str) -> bool:
        return config.rotate and fold == "value"

    @classmethod
    def plan_group(cls, step: GroupStep) -> None:
        g, rng = step.g, step.rng
        if not rng.config.rotate or g.fold != "value" or g.value_layer is None:
            return
        rot = fold_head_rotation(g, rng.head_dims, rng.final_w, rng.final_b, rng.changed_bias)
        step.rotation = rng.plan.rotations[g.tensor] = rot
        rng.plan.value_folds.add(g.value_layer)
        step.lo, step.hi, step.magnitude, step.values = rotated_range(step.values, step.rotation, step.lo, step.hi)
