"""Graph passes that write a RangePlan into an FP graph: fold or insert the smoothing, replace
weights by integer initializers + DequantizeLinear (per output channel), put per-tensor
QuantizeLinear -> DequantizeLinear on each quantized linear's input, and add the optional FP
low-rank error branches. Each pass is ``(graph, config, target) -> graph`` with config = PassConfig."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from qexport.passes.analyze import Group
from qexport.passes.attention import AttentionSite, quantize_attention
from qexport.passes.graph import constant_input, consumers, node_named, write_bias
from qexport.passes.plan import RangePlan
from qexport.passes.shift import insert_shift
from qexport.passes.sink import sink_smoothing
from qexport.targets.profile import TargetProfile

PACKED = {"int4": onnx.TensorProto.INT4, "uint4": onnx.TensorProto.UINT4}  # written by pack_low_bit


@dataclass(frozen=True, kw_only=True)
class PassConfig:
    """What the passes of one range need: its plan, the groups and each layer's MatMul node."""

    plan: RangePlan
    groups: list[Group]
    nodes: dict[str, str]  # layer -> MatMul node name
    attention: dict[str, AttentionSite] = field(default_factory=dict)  # attention module -> its MatMuls


def _const(name: str, values: np.ndarray) -> gs.Constant:
    return gs.Constant(name, np.require(values, requirements="C"))  # (ascontiguousarray makes scalars 1-D)


def pack_low_bit(model: onnx.ModelProto, plan: RangePlan) -> onnx.ModelProto:
    """Store 4-bit weights and zero points as packed INT4/UINT4 initializers (held as int8 until here)."""
    names = {
        f"{layer}::{role}": PACKED[lp.w_grid.storage]
        for layer, lp in plan.layers.items()
        if lp.w_grid.storage in PACKED
        for role in ("w_q", "w_zero")
    }
    for init in model.graph.initializer:
        if init.name in names:
            values = onnx.numpy_helper.to_array(init)
            init.CopyFrom(onnx.helper.make_tensor(init.name, names[init.name], values.shape, values.flatten().tolist()))
    return model


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
                const = constants[name]
                const.values = (np.asarray(const.values, dtype=np.float64) / s).astype(np.float32)
        elif g.fold == "value" and g.value_layer:
            _write_value_bias(graph, config, g.value_layer, cons)
        else:
            x = graph.tensors()[g.tensor]
            y = gs.Variable(f"{g.tensor}::smoothed", dtype=np.float32)
            inv = _const(f"{g.tensor}::inv_s", (1.0 / s).astype(np.float32))
            mul = gs.Node("Mul", f"{g.tensor}::smooth", inputs=[x, inv], outputs=[y])
            graph.nodes.append(mul)
            for layer in g.layers:
                node_named(graph, config.nodes[layer]).inputs[0] = y
    return graph


def _write_value_bias(graph: gs.Graph, config: PassConfig, value_layer: str, cons: dict[str, list[gs.Node]]) -> None:
    """Write the plan's changed bias (divided by s, rotated) into the value projection's bias Add."""
    bias = config.plan.layers[value_layer].bias
    if bias is not None:
        write_bias(graph, config.nodes[value_layer], bias, cons)


def fold_rotation(graph: gs.Graph, config: PassConfig, target: TargetProfile) -> gs.Graph:
    """Rotated attention-output groups: the value projection's bias becomes b_v·R (its weights and
    the output linear's come rotated from the plan through quantize_weights)."""
    cons = consumers(graph)
    for g in config.groups:
        if g.tensor in config.plan.rotations and g.value_layer:
            _write_value_bias(graph, config, g.value_layer, cons)
    return graph


def insert_online_rotation(graph: gs.Graph, config: PassConfig, target: TargetProfile) -> gs.Graph:
    """x -> x·R before the quantizer of each group the plan rotates online (its weights come as Rᵀ·W
    from the plan). R is block-diagonal, so it runs as Reshape(x, [-1, B]) · H_B, reshaped back to
    x's shape: C·B MACs per row, not C²."""
    for g in config.groups:
        rot = config.plan.online.get(g.tensor)
        if rot is None:
            continue
        x = node_named(graph, config.nodes[g.layers[0]]).inputs[0]
        block = int(np.count_nonzero(rot[0]))
        name = f"{g.tensor}::rotate"
        rows, turned = gs.Variable(f"{name}_rows", dtype=np.float32), gs.Variable(f"{name}_out", dtype=np.float32)
        shape = gs.Variable(f"{name}_shape", dtype=np.int64)
        y = gs.Variable(f"{g.tensor}::rotated", dtype=np.float32, shape=x.shape)
        blocks = _const(f"{name}_blocks", np.array([-1, block], dtype=np.int64))
        h = _const(f"{name}_hadamard", rot[:block, :block].astype(np.float32))
        graph.nodes.append(gs.Node("Reshape", f"{name}_split", inputs=[x, blocks], outputs=[rows]))
        graph.nodes.append(gs.Node("MatMul", name, inputs=[rows, h], outputs=[turned]))
        graph.nodes.append(gs.Node("Shape", f"{name}_of", inputs=[x], outputs=[shape]))
        graph.nodes.append(gs.Node("Reshape", f"{name}_join", inputs=[turned, shape], outputs=[y]))
        for layer in g.layers:
            node_named(graph, config.nodes[layer]).inputs[0] = y
    return graph


def quantize_weights(graph: gs.Graph, config: PassConfig, target: TargetProfile) -> gs.Graph:
    """Replace each linear's weight by integer W^T + DequantizeLinear(axis=1), per output channel
    (a scalar scale and zero point where the target quantizes weights per tensor)."""
    for layer, node_name in config.nodes.items():
        lp = config.plan.layers[layer]
        node = node_named(graph, node_name)
        out = gs.Variable(f"{layer}::w_dq", dtype=np.float32)
        per_channel = target.weight_per_channel
        scale, zero = (lp.w_scale, lp.w_zero) if per_channel else (lp.w_scale[0], lp.w_zero[0])
        inputs = [
            _const(f"{layer}::w_q", lp.w_q),
            _const(f"{layer}::w_scale", np.asarray(scale)),
            _const(f"{layer}::w_zero", np.asarray(zero)),
        ]
        attrs = {"axis": 1} if per_channel else {}
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
        scale = _const(f"{g.tensor}::a_scale", np.asarray(lp.a_scale, dtype=np.float32))
        zero = _const(f"{g.tensor}::a_zero", np.asarray(lp.a_zero))
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
        a, b = _const(f"{layer}::lowrank_a", lp.lowrank_a), _const(f"{layer}::lowrank_b", lp.lowrank_b)
        graph.nodes.append(gs.Node("MatMul", f"{layer}::lowrank_xa", inputs=[matmul.inputs[0], a], outputs=[h]))
        graph.nodes.append(gs.Node("MatMul", f"{layer}::lowrank_ab", inputs=[h, b], outputs=[c]))
        graph.nodes.append(gs.Node("Add", f"{layer}::lowrank_add", inputs=[before, c], outputs=[y]))
    return graph


PASSES = (
    fold_smoothing,
    fold_rotation,
    insert_shift,
    sink_smoothing,
    insert_online_rotation,
    quantize_weights,
    quantize_activations,
    quantize_attention,
    legalize_bias,
    insert_lowrank,
)


def run_passes(graph: gs.Graph, config: PassConfig, target: TargetProfile) -> gs.Graph:
    for p in PASSES:
        graph = p(graph, config, target)
    return graph.cleanup().toposort()
