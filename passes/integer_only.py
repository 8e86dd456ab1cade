"""Integer-only emission, for NPUs without float kernels: every float activation the earlier passes
left gets a per-tensor QuantizeLinear -> DequantizeLinear of the target's integer-only storage (from
ranges observed on the emitted graph), data-movement ops reuse their input's parameters, and float
constants that feed compute become quantized constants. Graphs of other targets are left alone."""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs
from qexport.passes.graph import const, consumers, producers, quantize_after, swap_input
from qexport.passes.quant import Grid, qparams
from qexport.targets.profile import TargetProfile

from qexport.errors import QexportError

QDQ = ("QuantizeLinear", "DequantizeLinear")
# ops that only move, select or repeat elements: their output is on their data input's grid
DATA_MOVEMENT = ("Reshape", "Transpose", "Squeeze", "Unsqueeze", "Slice", "Split", "Gather", "Expand", "Tile",
                 "Flatten", "DepthToSpace", "SpaceToDepth")  # fmt: skip
ELEMENTWISE = ("Add", "Sub", "Mul", "Div")
FLOAT = np.dtype(np.float32)
BITS = {"uint8": 8, "uint16": 16, "int8": 8, "int16": 16}


def observed_tensors(graph: gs.Graph) -> list[str]:
    """The float activations whose ranges integer_only needs: graph inputs and outputs of compute
    nodes that are not already quantized and do not merely move their input's elements."""
    made, cons = producers(graph), consumers(graph)
    names = []
    for t in _float_activations(graph, made):
        source = made.get(t.name)
        if source is not None and source.op in DATA_MOVEMENT:
            continue
        users = cons.get(t.name, [])
        if users and all(u.op == "QuantizeLinear" for u in users):
            continue
        names.append(t.name)
    return names


def integer_only(graph: gs.Graph, ranges: dict[str, tuple[float, float]], target: TargetProfile) -> gs.Graph:
    """Quantize every float activation and every float constant that feeds compute (see module).

    Args:
        ranges: (min, max) of each tensor observed_tensors names, over the range's calibration inputs.

    Raises:
        QexportError: a tensor that needs a range has none.
    """
    storage = target.integer_activations
    if storage is None:
        return graph
    grid = Grid(bits=BITS[storage], storage=storage, symmetric=False)
    graph.toposort()
    made = producers(graph)
    preset = _moved_to_quantizers(graph, made)
    for t in _float_activations(graph, made):
        cons = consumers(graph)
        users = [u for u in cons.get(t.name, []) if u.op != "GraphOutput"]
        q_users = [u for u in users if u.op == "QuantizeLinear"]
        source = made.get(t.name)
        moved = source is not None and source.op in DATA_MOVEMENT and _dequantized(source.inputs[0], made)
        if q_users and len(q_users) == len(users) and t not in graph.outputs:
            continue  # quantized already (a linear's input or output)
        if q_users:  # others read the quantizer's dequantized copy
            dq = next(iter(cons.get(q_users[0].outputs[0].name, [])), None)
            if dq is None or dq.op != "DequantizeLinear":
                raise QexportError(f"tensor {t.name!r}: its QuantizeLinear has no DequantizeLinear to share")
            for u in users:
                if u.op != "QuantizeLinear":
                    swap_input(u, t, dq.outputs[0])
            continue
        if moved:
            dq = made[source.inputs[0].name]  # type: ignore[union-attr]
            scale, zero = dq.inputs[1], dq.inputs[2]
        elif t.name in preset:
            scale, zero = preset[t.name]
        else:
            if t.name not in ranges:
                raise QexportError(f"tensor {t.name!r}: no observed range for its {storage} quantizer")
            lo, hi = ranges[t.name]
            s, z = qparams(np.asarray(lo), np.asarray(hi), grid)
            scale, zero = const(f"{t.name}::i_scale", s), const(f"{t.name}::i_zero", z)
        _insert(graph, t, scale, zero, users)
        made = producers(graph)
    _quantize_constants(graph, target)
    return graph.cleanup().toposort()


def _float_activations(graph: gs.Graph, made: dict[str, gs.Node]) -> list[gs.Variable]:
    """Float variables, in topological order, not written by QuantizeLinear / DequantizeLinear."""
    seen: dict[str, gs.Variable] = {}
    for t in graph.inputs:
        if isinstance(t, gs.Variable) and _is_float(t):
            seen[t.name] = t
    for node in graph.nodes:
        if node.op in QDQ:
            continue
        for t in node.outputs:
            if isinstance(t, gs.Variable) and _is_float(t):
                seen[t.name] = t
    return list(seen.values())


def _is_float(t: gs.Tensor) -> bool:
    return t.dtype is not None and np.dtype(t.dtype) == FLOAT


def _dequantized(t: gs.Tensor, made: dict[str, gs.Node]) -> bool:
    source = made.get(t.name)
    return source is not None and source.op == "DequantizeLinear" and isinstance(source.inputs[0], gs.Variable)


def _moved_to_quantizers(graph: gs.Graph, made: dict[str, gs.Node]) -> dict[str, tuple[gs.Tensor, gs.Tensor]]:
    """Tensors whose only path onward is a chain of data-movement ops into an existing QuantizeLinear
    (a linear's input quantizer): the chain's first tensor takes that quantizer's scale and zero
    point, so every op of the chain reads and writes one grid (HTP runs such an op on integers only
    when its input and output share parameters)."""
    cons = consumers(graph)
    preset: dict[str, tuple[gs.Tensor, gs.Tensor]] = {}
    for q in graph.nodes:
        if q.op != "QuantizeLinear" or len(cons.get(q.inputs[0].name, [])) != 1:
            continue
        t = q.inputs[0]
        while (source := made.get(t.name)) is not None and source.op in DATA_MOVEMENT:
            t = source.inputs[0]
            if len(cons.get(t.name, [])) != 1 or not _is_float(t):
                break
        else:
            if t is not q.inputs[0] and _is_float(t):
                preset[t.name] = (q.inputs[1], q.inputs[2])
    return preset


def _same_params(q: gs.Node, dq: gs.Node) -> bool:
    """Whether a QuantizeLinear and a DequantizeLinear use the same scale and zero point."""
    values = [np.asarray(t.values) if isinstance(t, gs.Constant) else t.name for t in (*q.inputs[1:3], *dq.inputs[1:3])]
    return all(np.array_equal(a, b) for a, b in zip(values[:2], values[2:], strict=True))


def _insert(graph: gs.Graph, t: gs.Variable, scale: gs.Tensor, zero: gs.Tensor, users: list[gs.Node]) -> None:
    """t -> Q -> DQ; its users read the DQ output (a graph output keeps its name on the DQ output)."""
    dq = quantize_after(graph, t, scale, zero, f"{t.name}::i", users)
    if t in graph.outputs:
        index = graph.outputs.index(t)
        name = t.name
        t.name, dq.name = f"{name}::i_float", name
        graph.outputs[index] = dq


def _quantize_constants(graph: gs.Graph, target: TargetProfile) -> None:
    """Each float constant a compute node reads becomes integers + DequantizeLinear (per tensor,
    asymmetric; a LayerNormalization scale in uint8, where the target asks for an unsigned one)."""
    storage = target.integer_activations or "uint16"
    done: dict[str, gs.Variable] = {}  # a constant read by several nodes is dequantized once
    for node in list(graph.nodes):
        if node.op in QDQ:
            continue
        for i, t in enumerate(node.inputs):
            if not isinstance(t, gs.Constant) or not _is_float(t):
                continue
            if t.name in done:
                node.inputs[i] = done[t.name]
                continue
            values = _broadcast(node, np.asarray(t.values, dtype=np.float32))
            if node.op in ("Conv", "Gemm", "LayerNormalization") and i == 2:
                node.inputs[i] = done[t.name] = _int32_bias(graph, node, t, values)
                continue
            axis = _weight_axis(node, i, values, target)
            if axis is not None:  # a float linear's weight: the target's 8-bit weights, per output channel
                weight = target.weight_type(8)
                grid = Grid(bits=8, storage=weight, symmetric=True)
                other = tuple(a for a in range(values.ndim) if a != axis)
                s, z = qparams(values.min(axis=other), values.max(axis=other), grid)
                shape = [-1 if a == axis else 1 for a in range(values.ndim)]
                attrs = {"axis": axis}
            else:
                kind = "uint8" if node.op == "LayerNormalization" and i == 1 and target.unsigned_norm_gamma else storage
                grid = Grid(bits=BITS[kind], storage=kind, symmetric=False)
                s, z = qparams(values.min(), values.max(), grid)
                shape, attrs = [], {}
            scale, zero = s.reshape(shape) if shape else s, z.reshape(shape) if shape else z
            integers = np.clip(np.round(values / scale) + zero.astype(np.int64), grid.qmin, grid.qmax).astype(z.dtype)
            dq = gs.Variable(f"{t.name}::c_dq", dtype=np.float32, shape=list(values.shape))
            inputs = [const(f"{t.name}::c_q", integers), const(f"{t.name}::c_scale", s),
                      const(f"{t.name}::c_zero", z)]  # fmt: skip
            graph.nodes.append(
                gs.Node("DequantizeLinear", f"{t.name}::c_dequant", attrs=attrs, inputs=inputs, outputs=[dq])
            )
            node.inputs[i] = done[t.name] = dq


def _weight_axis(node: gs.Node, index: int, values: np.ndarray, target: TargetProfile) -> int | None:
    """The output-channel axis of a float weight a quantized op reads (None: not a weight)."""
    if node.op not in target.quantized_ops or index != 1 or values.ndim < 2:
        return None
    if node.op == "Gemm":
        return 0 if node.attrs.get("transB", 0) else 1
    return 0 if node.op == "Conv" else values.ndim - 1


def _int32_bias(graph: gs.Graph, node: gs.Node, t: gs.Constant, values: np.ndarray) -> gs.Variable:
    """A Conv / Gemm bias as int32 on the scale activation scale x weight scale (per output channel),
    zero point 0: the form the integer Conv / Gemm unit takes.

    Raises:
        QexportError: the node's activation or weight is not dequantized from constants.
    """
    made = producers(graph)
    sources = [made.get(x.name) for x in node.inputs[:2]]
    if not all(s is not None and s.op == "DequantizeLinear" for s in sources):
        raise QexportError(f"node {node.name!r}: its bias is quantized on its operands' scales, which it lacks")
    scales = [np.asarray(s.inputs[1].values, dtype=np.float64) for s in sources if s is not None]
    scale = (scales[0] * scales[1]).astype(np.float32)
    integers = np.round(values / scale).astype(np.int32)
    zero = np.zeros(scale.shape, np.int32)
    dq = gs.Variable(f"{t.name}::c_dq", dtype=np.float32, shape=list(values.shape))
    inputs = [const(f"{t.name}::c_q", integers), const(f"{t.name}::c_scale", scale), const(f"{t.name}::c_zero", zero)]
    attrs = {"axis": 0} if scale.ndim else {}
    graph.nodes.append(gs.Node("DequantizeLinear", f"{t.name}::c_dequant", attrs=attrs, inputs=inputs, outputs=[dq]))
    return dq


def _broadcast(node: gs.Node, values: np.ndarray) -> np.ndarray:
    """A constant operand of a binary elementwise op expanded to the op's output shape where it
    broadcasts along a leading axis over more than one non-unit axis: the HTP simulator's integer
    add of such a static tensor differs from onnxruntime (cos 0.998 on one tiny Latte step; the
    full-shape constant agrees)."""
    shape = node.outputs[0].shape if node.op in ELEMENTWISE and node.outputs else None
    if not shape or not all(isinstance(d, int) for d in shape) or values.size in (1, int(np.prod(shape))):
        return values
    if sum(d > 1 for d in values.shape) < 2:
        return values
    return np.ascontiguousarray(np.broadcast_to(values, shape))
