"""A rank-r FP branch per linear that compensates its weight-quantization error."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import onnx_graphsurgeon as gs
from qexport.passes.gptq import on_host
from qexport.passes.graph import const, constant_input, consumers, node_named
from qexport.passes.lowrank import MAX_RANK, lowrank_factors
from qexport.passes.rangeplan import LayerStep
from qexport.passes.rewrite import PassConfig
from qexport.passes.techniques.base import GraphPass, Shape, Technique
from qexport.targets.profile import TargetProfile

from qexport.errors import QexportError


def insert_lowrank(graph: gs.Graph, config: PassConfig, target: TargetProfile) -> gs.Graph:
    """Add ``(x_dq · A) · B`` to each quantized linear's output after its bias Add, if planned.

    The branch reads the same DequantizeLinear output as the quantized MatMul, and the
    MatMul -> Add(bias) pair stays intact, so onnxruntime still fuses it to an integer kernel.
    """
    cons = consumers(graph)
    for layer, node_name in config.nodes.items():
        lp = config.plan.layers[layer]
        if lp.lowrank_a is None or lp.lowrank_b is None:
            continue
        matmul = node_named(graph, node_name)
        adds = [n for n in cons.get(matmul.outputs[0].name, []) if n.op == "Add"]
        last = adds[0] if len(adds) == 1 and constant_input(adds[0]) is not None else matmul
        y = last.outputs[0]
        before = gs.Variable(f"{layer}::lowrank_in", dtype=np.float32, shape=y.shape)
        last.outputs[0] = before
        h = gs.Variable(f"{layer}::lowrank_h", dtype=np.float32)
        c = gs.Variable(f"{layer}::lowrank_c", dtype=np.float32, shape=y.shape)
        a, b = const(f"{layer}::lowrank_a", lp.lowrank_a), const(f"{layer}::lowrank_b", lp.lowrank_b)
        graph.nodes.append(gs.Node("MatMul", f"{layer}::lowrank_xa", inputs=[matmul.inputs[0], a], outputs=[h]))
        graph.nodes.append(gs.Node("MatMul", f"{layer}::lowrank_ab", inputs=[h, b], outputs=[c]))
        graph.nodes.append(gs.Node("Add", f"{layer}::lowrank_add", inputs=[before, c], outputs=[y]))
    return graph


@dataclass(frozen=True, kw_only=True)
class LowRank(Technique):
    kind = "lowrank"
    summary = "an FP rank-r branch per linear: output += (x·A)·B, from the SVD of the weight error"
    rewrites: ClassVar[Mapping[str, GraphPass]] = {"branch": insert_lowrank}

    rank: int = 16

    def check(self, shape: Shape) -> None:
        super().check(shape)
        if not 1 <= self.rank <= MAX_RANK:
            raise QexportError(f"recipe key 'lowrank.rank' must be in 1..{MAX_RANK}, got {self.rank}")

    def settings(self) -> dict[str, Any]:
        return {"lowrank": self.rank}

    @classmethod
    def plan_layer(cls, step: LayerStep) -> None:
        rank = step.rng.config.lowrank
        if rank:
            step.lp.lowrank_a, step.lp.lowrank_b = lowrank_factors(
                step.w, step.lp.weight(), step.magnitude, rank, None if step.hessian is None else on_host(step.hessian)
            )
