"""Small onnx-graphsurgeon helpers shared by the passes: producers, consumers, constants, appending nodes."""

from __future__ import annotations

from typing import Any

import numpy as np
import onnx_graphsurgeon as gs


def producers(graph: gs.Graph) -> dict[str, gs.Node]:
    return {t.name: n for n in graph.nodes for t in n.outputs}


def consumers(graph: gs.Graph) -> dict[str, list[gs.Node]]:
    out: dict[str, list[gs.Node]] = {}
    for n in graph.nodes:
        for t in n.inputs:
            out.setdefault(t.name, []).append(n)
    for t in graph.outputs:
        out.setdefault(t.name, []).append(gs.Node(op="GraphOutput"))
    return out


def node_named(graph: gs.Graph, name: str) -> gs.Node:
    for n in graph.nodes:
        if n.name == name:
            return n
    raise KeyError(name)


def constant_input(node: gs.Node) -> tuple[int, gs.Constant] | None:
    """The (index, tensor) of the node's only constant input, if exactly one of two is constant."""
    found = [(i, t) for i, t in enumerate(node.inputs) if isinstance(t, gs.Constant)]
    return found[0] if len(found) == 1 and len(node.inputs) == 2 else None


def per_channel(const: gs.Constant, channels: int) -> bool:
    """True when the constant broadcasts along the last axis with exactly `channels` entries."""
    shape = np.asarray(const.values).shape
    return len(shape) >= 1 and shape[-1] == channels


def write_bias(graph: gs.Graph, matmul_name: str, bias: np.ndarray, cons: dict[str, list[gs.Node]]) -> bool:
    """Write a linear's bias into the constant of the Add after its MatMul; False if there is none."""
    matmul = node_named(graph, matmul_name)
    add = next((n for n in cons.get(matmul.outputs[0].name, []) if n.op == "Add"), None)
    found = constant_input(add) if add is not None else None
    if found is None:
        return False
    found[1].values = np.asarray(bias, dtype=np.float32).reshape(np.asarray(found[1].values).shape)
    return True


def swap_input(node: gs.Node, old: gs.Tensor, new: gs.Tensor) -> None:
    """Let node read `new` wherever it reads `old`."""
    for i, t in enumerate(node.inputs):
        if t is old:
            node.inputs[i] = new


def const(name: str, values: np.ndarray) -> gs.Constant:
    """A named constant holding a C-contiguous copy (np.ascontiguousarray would make scalars 1-D)."""
    return gs.Constant(name, np.require(values, requirements="C"))


def quantize_after(
    graph: gs.Graph, t: gs.Tensor, scale: gs.Tensor, zero: gs.Tensor, prefix: str, users: list[gs.Node]
) -> gs.Variable:
    """t -> QuantizeLinear -> DequantizeLinear (tensors ``<prefix>_q`` / ``<prefix>_dq``, nodes
    ``<prefix>_quant`` / ``<prefix>_dequant``); `users` read the DequantizeLinear's output, returned."""
    q = gs.Variable(f"{prefix}_q", dtype=zero.dtype, shape=t.shape)
    dq = gs.Variable(f"{prefix}_dq", dtype=np.float32, shape=t.shape)
    graph.nodes.append(gs.Node("QuantizeLinear", f"{prefix}_quant", inputs=[t, scale, zero], outputs=[q]))
    graph.nodes.append(gs.Node("DequantizeLinear", f"{prefix}_dequant", inputs=[q, scale, zero], outputs=[dq]))
    for user in users:
        swap_input(user, t, dq)
    return dq


class Appender:
    """Appends one-output nodes to a graph, named ``<prefix><key>`` (tensor) and ``<prefix><key>_op`` (node)."""

    def __init__(self, graph: gs.Graph, prefix: str) -> None:
        self.graph, self.prefix = graph, prefix

    def const(self, key: str, value: Any, dtype: Any = np.float32) -> gs.Constant:
        return const(f"{self.prefix}{key}", np.asarray(value, dtype=dtype))

    def __call__(
        self, op: str, key: str, inputs: list[gs.Tensor], dtype: Any = np.float32, **attrs: Any
    ) -> gs.Variable:
        out = gs.Variable(f"{self.prefix}{key}", dtype=dtype)
        self.graph.nodes.append(gs.Node(op, f"{self.prefix}{key}_op", attrs=attrs, inputs=inputs, outputs=[out]))
        return out
