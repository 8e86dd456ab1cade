"""Layout ops a target's rank limit and op rules accept: a one-input Einsum that only permutes
becomes a Transpose; a Reshape -> permutation -> Reshape chain through a tensor above the
target's rank (patchify / unpatchify) becomes rank <= 4 block swaps; float -> float Casts go.
Exact rewrites (the same elements in the same places); other targets are left alone."""

from __future__ import annotations

import math

import numpy as np
import onnx_graphsurgeon as gs
from qexport.passes.graph import consumers, producers, swap_input
from qexport.passes.rewrite import PassConfig
from qexport.targets.profile import TargetProfile

FLOAT = np.dtype(np.float32)


def einsum_permutation(equation: str) -> list[int] | None:
    """The axis order of a one-input Einsum that is a pure permutation ('nhwpqc->nchpwq' ->
    [0, 5, 1, 3, 2, 4]), else None."""
    left, arrow, right = equation.replace(" ", "").partition("->")
    ok = arrow and "," not in left and "." not in left and sorted(left) == sorted(right) == sorted(set(left))
    return [left.index(c) for c in right] if ok else None


def block_swaps(shape: list[int], perm: list[int]) -> list[tuple[list[int], list[int]]]:
    """Write ``transpose(x.reshape(shape), perm)`` as steps (view shape, axis order) of rank <= 4.

    Each step swaps two adjacent blocks of axes: the tensor viewed as [before, A, B, after] is
    transposed (0, 2, 1, 3). Runs of axes that stay adjacent move together.

    Returns:
        The steps in order; the last one's output, reshaped to the permuted shape, is the result.
    """
    order = list(range(len(shape)))  # current layout: which source axis sits at each position
    steps: list[tuple[list[int], list[int]]] = []
    for i, want in enumerate(perm):
        j = order.index(want)
        if j == i:
            continue
        k = 1  # the run of wanted axes already adjacent at j
        while j + k < len(order) and i + k < len(perm) and order[j + k] == perm[i + k]:
            k += 1
        sizes = [shape[a] for a in order]
        view = [math.prod(sizes[:i]), math.prod(sizes[i:j]), math.prod(sizes[j : j + k]), math.prod(sizes[j + k :])]
        steps.append((view, [0, 2, 1, 3]))
        order = order[:i] + order[j : j + k] + order[i:j] + order[j + k :]
    return steps


def _permutation(node: gs.Node) -> list[int] | None:
    if node.op == "Transpose":
        return [int(a) for a in node.attrs["perm"]]
    if node.op == "Einsum" and len(node.inputs) == 1:
        return einsum_permutation(str(node.attrs.get("equation", "")))
    return None


def _static(t: gs.Tensor) -> list[int] | None:
    shape = t.shape
    return [int(d) for d in shape] if shape is not None and all(isinstance(d, int) for d in shape) else None


def _reshape(graph: gs.Graph, x: gs.Tensor, shape: list[int], name: str, out: gs.Tensor | None = None) -> gs.Tensor:
    y = out if out is not None else gs.Variable(f"{name}_out", dtype=x.dtype, shape=shape)
    target = gs.Constant(f"{name}_shape", np.asarray(shape, dtype=np.int64))
    graph.nodes.append(gs.Node("Reshape", name, inputs=[x, target], outputs=[y]))
    return y


def _rewrite_chain(graph: gs.Graph, first: gs.Node, middle: gs.Node, last: gs.Node, perm: list[int]) -> None:
    """Replace Reshape(first) -> permutation(middle) -> Reshape(last) by rank <= 4 block swaps."""
    x, shape, y = first.inputs[0], _static(first.outputs[0]), last.outputs[0]
    assert shape is not None
    for node in (first, middle, last):
        node.outputs.clear()
    t = x
    for index, (view, axes) in enumerate(block_swaps(shape, perm)):
        t = _reshape(graph, t, view, f"{middle.name}_view{index}")
        swapped = gs.Variable(f"{middle.name}_swap{index}", dtype=x.dtype, shape=[view[a] for a in axes])
        graph.nodes.append(gs.Node("Transpose", f"{middle.name}_swap{index}", attrs={"perm": axes},
                                   inputs=[t], outputs=[swapped]))  # fmt: skip
        t = swapped
    _reshape(graph, t, _static(y) or list(y.shape), f"{middle.name}_view_out", out=y)


def legalize_layout(graph: gs.Graph, config: PassConfig, target: TargetProfile) -> gs.Graph:
    """Rewrite the layout ops the target refuses (see the module docstring); nothing where it
    takes one-input Einsums and has no rank limit."""
    if target.single_input_einsum and target.max_rank is None:
        return graph
    limit = target.max_rank if target.max_rank is not None else 1 << 30
    cons, made = consumers(graph), producers(graph)
    for node in list(graph.nodes):
        perm = _permutation(node)
        if perm is None or not node.outputs:
            continue
        rank = len(perm)
        source = made.get(node.inputs[0].name)
        after = cons.get(node.outputs[0].name, [])
        chain = source is not None and source.op == "Reshape" and len(cons.get(source.outputs[0].name, [])) == 1
        chain = chain and len(after) == 1 and after[0].op == "Reshape" and _static(node.inputs[0]) is not None
        if rank > limit and chain and source is not None and _static(after[0].outputs[0]) is not None:
            _rewrite_chain(graph, source, node, after[0], perm)
        elif node.op == "Einsum" and not target.single_input_einsum:
            node.op, node.attrs = "Transpose", {"perm": perm}
    for node in graph.nodes:  # float -> float Casts
        source_type = node.inputs[0].dtype if node.op == "Cast" and node.inputs else None
        if source_type is not None and np.dtype(source_type) == FLOAT and node.attrs.get("to") == 1:
            _bypass(graph, node, cons)
    return graph.cleanup()


def _bypass(graph: gs.Graph, node: gs.Node, cons: dict[str, list[gs.Node]]) -> None:
    """Let node's consumers read its input (a graph output keeps its name: the Cast stays)."""
    x, y = node.inputs[0], node.outputs[0]
    if y in graph.outputs:
        return
    for user in cons.get(y.name, []):
        swap_input(user, y, x)
    node.outputs.clear()
