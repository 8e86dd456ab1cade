"""Move an explicit smoothing ``Mul(x, 1/s)`` onto the small operands of a runtime modulation
``x = a*m + b`` (m, b broadcast over tokens: adaLN scale and shift computed from the timestep or
the class): (a*m + b)/s = a*(m/s) + b/s. The big activation is then scaled once, not twice; the
math is exact (float rounding aside). Leaves every other explicit Mul alone."""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs
from qexport.passes.graph import consumers, producers

SMALL = 8  # an operand is "small" when the big operand has at least this many times its elements


def _numel(t: gs.Tensor) -> int | None:
    shape = t.shape if not isinstance(t, gs.Constant) else np.asarray(t.values).shape
    if shape is None or any(not isinstance(d, int) for d in shape):
        return None
    return int(np.prod(shape, dtype=np.int64))


def _split(node: gs.Node) -> tuple[int, gs.Tensor, gs.Tensor] | None:
    """(index of the small operand, small, big) of a binary node, or None."""
    if len(node.inputs) != 2:
        return None
    sizes = [_numel(t) for t in node.inputs]
    known = [n for n in sizes if n is not None]
    if len(known) != 2:
        return None
    for i in (0, 1):
        if known[1 - i] >= SMALL * max(known[i], 1):
            return i, node.inputs[i], node.inputs[1 - i]
    return None


def _sole_producer(
    t: gs.Tensor, op: str, prod: dict[str, gs.Node], cons: dict[str, list[gs.Node]]
) -> tuple[gs.Node, tuple[int, gs.Tensor, gs.Tensor]] | None:
    """The `op` node producing t, read by nothing else, with its small/big operand split."""
    node = prod.get(t.name)
    if node is None or node.op != op or len(cons.get(t.name, [])) != 1:
        return None
    split = _split(node)
    return None if split is None else (node, split)


def sink_smoothing(graph: gs.Graph, config: object, target: object) -> gs.Graph:
    """Rewrite Mul(Add(Mul(a, m), b), inv) as Add(Mul(a, Mul(m, inv)), Mul(b, inv)) for smoothing Muls."""
    prod, cons = producers(graph), consumers(graph)
    for smooth in [n for n in graph.nodes if n.op == "Mul" and n.name.endswith("::smooth")]:
        x, inv = smooth.inputs
        found_add = _sole_producer(x, "Add", prod, cons)
        if found_add is None:
            continue
        add, (b_index, b, p) = found_add
        found_mul = _sole_producer(p, "Mul", prod, cons)
        if found_mul is None:
            continue
        mul, (m_index, m, _) = found_mul
        for node, index, small in ((mul, m_index, m), (add, b_index, b)):
            scaled = gs.Variable(f"{small.name}::{smooth.name}", dtype=np.float32)
            graph.nodes.append(gs.Node("Mul", f"{scaled.name}::mul", inputs=[small, inv], outputs=[scaled]))
            node.inputs[index] = scaled
        y = smooth.outputs[0]
        for reader in cons.get(y.name, []):
            for i, t in enumerate(reader.inputs):
                if t is y:
                    reader.inputs[i] = x
        smooth.outputs.clear()
    return graph.cleanup().toposort()
