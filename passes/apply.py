"""Graph passes that write a RangePlan into an FP graph. The registered techniques contribute
their rewrites by stage (passes.techniques); between them the build itself replaces each
linear's weight by integers + DequantizeLinear (per output channel), puts a per-tensor
QuantizeLinear -> DequantizeLinear on each quantized linear's input, and shapes biases for the
target. Each pass is ``(graph, PassConfig, target) -> graph``; each does nothing where the plan
holds nothing of its kind."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from qexport.passes.close import close_linears
from qexport.passes.graph import const, constant_input, consumers, node_named
from qexport.passes.layout import legalize_layout
from qexport.passes.rangeplan import RangePlan
from qexport.passes.rewrite import PassConfig
from qexport.passes.techniques import ORDER
from qexport.passes.techniques.base import GraphPass
from qexport.passes.weight_only import store_float_weights
from qexport.targets.profile import TargetProfile

PACKED = {"int4": onnx.TensorProto.INT4, "uint4": onnx.TensorProto.UINT4}  # written by pack_low_bit


def pack_low_bit(model: onnx.ModelProto, plan: RangePlan) -> onnx.ModelProto:
    """Store 4-bit weights and zero points as packed INT4/UINT4 initializers (held as int8 until here)."""
    names = {
        f"{layer}::{role}": PACKED[lp.w_grid.storage]
        for layer, lp in plan.layers.items()
        if lp.w_grid.storage in PACKED and not lp.coded
        for role in ("w_q", "w_zero")
    }
    # per-channel level codes of 16 levels or fewer: unsigned 4-bit (passes.techniques.twin_log)
    names |= {f"{layer}::w_q": onnx.TensorProto.UINT4 for layer, lp in plan.layers.items()
              if lp.levels is not None and lp.levels.shape[0] <= 16}  # fmt: skip
    for init in model.graph.initializer:
        if init.name in names:
            values = onnx.numpy_helper.to_array(init)
            init.CopyFrom(onnx.helper.make_tensor(init.name, names[init.name], values.shape, values.flatten().tolist()))
    return model


def quantize_weights(graph: gs.Graph, config: PassConfig, target: TargetProfile) -> gs.Graph:
    """Replace each linear's weight by integer W^T + DequantizeLinear(axis=1), per output channel
    (a scalar scale and zero point where the target quantizes weights per tensor; blocked along the
    input axis where the plan has groups of input channels)."""
    for layer, node_name in config.nodes.items():
        lp = config.plan.layers[layer]
        if lp.coded:  # codes into a lookup: the "codebook" stage writes it
            continue
        node = node_named(graph, node_name)
        out = gs.Variable(f"{layer}::w_dq", dtype=np.float32)
        per_channel, grouped = target.weight_per_channel, lp.w_scale.ndim == 2
        scale, zero = (lp.w_scale, lp.w_zero) if per_channel or grouped else (lp.w_scale[0], lp.w_zero[0])
        inputs = [
            const(f"{layer}::w_q", lp.w_q),
            const(f"{layer}::w_scale", np.asarray(scale)),
            const(f"{layer}::w_zero", np.asarray(zero)),
        ]
        # a group of g input channels per scale: opset 21's blocked DequantizeLinear along the input axis
        block = {"axis": 0, "block_size": lp.w_q.shape[0] // lp.w_scale.shape[0]} if grouped else None
        attrs = block or ({"axis": 1} if per_channel else {})
        graph.nodes.append(
            gs.Node("DequantizeLinear", f"{layer}::w_dequant", attrs=attrs, inputs=inputs, outputs=[out])
        )
        node.inputs[1] = out
    return graph


def quantize_activations(graph: gs.Graph, config: PassConfig, target: TargetProfile) -> gs.Graph:
    """Per-tensor static QuantizeLinear -> DequantizeLinear on each group's (smoothed) input."""
    for g in config.groups:
        first = node_named(graph, config.nodes[g.layers[0]])
        x = first.inputs[0]
        lp = config.plan.layers[g.layers[0]]
        scale = const(f"{g.tensor}::a_scale", np.asarray(lp.a_scale, dtype=np.float32))
        zero = const(f"{g.tensor}::a_zero", np.asarray(lp.a_zero))
        q = gs.Variable(f"{g.tensor}::a_q", dtype=lp.a_zero.dtype)
        dq = gs.Variable(f"{g.tensor}::a_dq", dtype=np.float32)
        graph.nodes.append(gs.Node("QuantizeLinear", f"{g.tensor}::a_quant", inputs=[x, scale, zero], outputs=[q]))
        graph.nodes.append(gs.Node("DequantizeLinear", f"{g.tensor}::a_dequant", inputs=[q, scale, zero], outputs=[dq]))
        for layer in g.layers:
            node_named(graph, config.nodes[layer]).inputs[0] = dq
    return graph


def legalize_bias(graph: gs.Graph, config: PassConfig, target: TargetProfile) -> gs.Graph:
    """Reshape each quantized MatMul's 1-D bias to the activation's rank when the target asks."""
    if not target.bias_full_rank:
        return graph
    cons = consumers(graph)
    for node_name in config.nodes.values():
        node = node_named(graph, node_name)
        rank = len(node.outputs[0].shape or [])  # the MatMul output keeps its inferred shape
        adds = [n for n in cons.get(node.outputs[0].name, []) if n.op == "Add"]
        found = constant_input(adds[0]) if len(adds) == 1 else None
        if rank < 3 or found is None:
            continue
        values = np.asarray(found[1].values)
        if values.ndim == 1 and len(cons.get(found[1].name, [])) == 1:
            found[1].values = values.reshape((1,) * (rank - 1) + values.shape)
    return graph


# The order of the rewrites: a stage name is filled by the techniques' rewrites of that stage (in
# the registry's order), a function is the build's own pass.
STAGES: tuple[str | GraphPass, ...] = (
    "fold",  # transforms folded into constants and weights (smoothing, head rotation)
    "shift",  # subtractions before the quantizer
    "sink",  # explicit scalings moved onto small operands
    "rotate",  # online transforms before the quantizer
    quantize_weights,
    "codebook",  # weights as codes into a lookup, decoded by a Gather (not expressible as DequantizeLinear)
    store_float_weights,  # the float-kept layers' weights as int8 (weight-only), where the plan says
    quantize_activations,
    "operands",  # quantizers on other operands (attention)
    legalize_bias,
    "branch",  # FP branches added to the outputs
    "dynamic",  # static activation quantizers replaced by run-time ones (a reference, not NPU-static)
    close_linears,  # output Q -> DQ on each quantized linear, where the target runs only closed units
    legalize_layout,  # rank-limited / one-input-Einsum-free layout ops, where the target asks
)


def passes() -> list[GraphPass]:
    """Every pass in order: the stages filled from the technique registry."""
    found: list[GraphPass] = []
    for stage in STAGES:
        found.extend([t.rewrites[stage] for t in ORDER if stage in t.rewrites] if isinstance(stage, str) else [stage])
    return found


def run_passes(graph: gs.Graph, config: PassConfig, target: TargetProfile) -> gs.Graph:
    for p in passes():
        graph = p(graph, config, target)
    return graph.cleanup().toposort()
