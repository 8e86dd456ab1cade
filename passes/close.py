"""Close each quantized linear for targets that run a QDQ unit only with a quantized output (QNN
HTP): QuantizeLinear -> DequantizeLinear on the MatMul's output, of the input quantizer's type,
with the output range the plan holds. Targets that keep the output float are left alone."""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs
from qexport.passes.graph import const, consumers, node_named, quantize_after
from qexport.passes.quant import qparams
from qexport.passes.rangeplan import RangePlan
from qexport.passes.rewrite import PassConfig
from qexport.targets.profile import TargetProfile

from qexport.errors import QexportError


def plan_outputs(plan: RangePlan, ranges: dict[str, tuple[float, float]], target: TargetProfile) -> None:
    """Give each linear of the plan its output quantizer: the range its MatMul result took in the
    simulated replay, on the grid (type and bits) of its input quantizer, as the target's closed
    unit needs.

    Raises:
        QexportError: a planned layer has no measured range.
    """
    for layer, lp in plan.layers.items():
        if layer not in ranges:
            raise QexportError(f"layer {layer!r}: no output range was measured for its output quantizer")
        lo, hi = ranges[layer]
        lp.o_scale, lp.o_zero = qparams(np.asarray(lo), np.asarray(hi), lp.a_grid, target.pow2_scales)


def close_linears(graph: gs.Graph, config: PassConfig, target: TargetProfile) -> gs.Graph:
    """Q -> DQ after every planned linear (before its bias Add, which stays float).

    Raises:
        QexportError: the target closes linears but a layer's plan has no output quantizer.
    """
    if not target.closed_linears:
        return graph
    cons = consumers(graph)
    for layer, node_name in config.nodes.items():
        lp = config.plan.layers[layer]
        if lp.o_scale is None or lp.o_zero is None:
            raise QexportError(f"layer {layer!r}: {target.name} needs an output quantizer and the plan has none")
        matmul = node_named(graph, node_name)
        y = matmul.outputs[0]
        users = cons.get(y.name, [])
        scale = const(f"{layer}::o_scale", np.asarray(lp.o_scale, dtype=np.float32))
        zero = const(f"{layer}::o_zero", np.asarray(lp.o_zero))
        quantize_after(graph, y, scale, zero, f"{layer}::o", users)
        if y in graph.outputs:
            raise QexportError(f"layer {layer!r}: a linear that is a graph output cannot be closed")
    return graph
