"""Find, for each quantized linear, the linears that read the same tensor (they share one
smoothing vector) and where 1/s can fold exactly: into the modulation constants of a per-step
model (LN(x)*(1+scale)+shift), into the value projection (attention-output linear), or nowhere
(an explicit per-channel Mul)."""

from __future__ import annotations

from dataclasses import dataclass

import onnx_graphsurgeon as gs
from qexport.passes.graph import constant_input, consumers, node_named, per_channel, producers

PASS_THROUGH = ("Reshape", "Squeeze", "Unsqueeze", "Identity")


FOLDS = ("modulation", "value", "explicit")  # where a group's smoothing folds (see the module doc)


@dataclass(frozen=True, kw_only=True)
class Group:
    """Linears reading one tensor, and how a smoothing vector on that tensor folds."""

    tensor: str
    layers: tuple[str, ...]
    channels: int
    fold: str  # one of FOLDS
    scale_const: str | None = None  # modulation: the Mul constant
    shift_const: str | None = None  # modulation: the Add constant
    value_layer: str | None = None  # value: the to_v linear


def find_groups(
    graph: gs.Graph, nodes: dict[str, str], channels: dict[str, int], values: dict[str, str] | None = None
) -> list[Group]:
    """Group layers by input tensor and decide each group's fold.

    Args:
        graph: the FP graph (constants folded for per-step models).
        nodes: layer name -> MatMul node name.
        channels: layer name -> input features.
        values: attention-output layer -> the value projection that feeds it (the model family
            names them); such a group folds 1/s into the value projection.
    """
    by_tensor: dict[str, list[str]] = {}
    for layer, node in nodes.items():
        by_tensor.setdefault(node_named(graph, node).inputs[0].name, []).append(layer)
    prod, cons = producers(graph), consumers(graph)
    groups = []
    for tensor, layers in by_tensor.items():
        c = channels[layers[0]]
        group_nodes = {nodes[layer] for layer in layers}
        mod = _modulation(tensor, group_nodes, c, prod, cons)
        value = _value_layer(layers, nodes, values or {})
        if mod is not None:
            groups.append(Group(tensor=tensor, layers=tuple(layers), channels=c, fold="modulation",
                                scale_const=mod[0], shift_const=mod[1]))  # fmt: skip
        elif value is not None:
            groups.append(Group(tensor=tensor, layers=tuple(layers), channels=c, fold="value", value_layer=value))
        else:
            groups.append(Group(tensor=tensor, layers=tuple(layers), channels=c, fold="explicit"))
    return groups


def _only_feeds(tensor: str, allowed: set[str], cons: dict[str, list[gs.Node]]) -> bool:
    return all(n.name in allowed for n in cons.get(tensor, []))


def _modulation(
    tensor: str, group_nodes: set[str], c: int, prod: dict[str, gs.Node], cons: dict[str, list[gs.Node]]
) -> tuple[str, str] | None:
    """(Mul constant, Add constant) of x*scale+shift producing tensor, each used by this chain only."""
    if not _only_feeds(tensor, group_nodes, cons):
        return None
    node = prod.get(tensor)
    while node is not None and node.op in PASS_THROUGH:
        if not _only_feeds(node.outputs[0].name, group_nodes | {node.name}, cons):
            return None
        src = node.inputs[0].name
        if len(cons.get(src, [])) != 1:
            return None
        group_nodes = {node.name}
        node = prod.get(src)
    if node is None or node.op != "Add":
        return None
    add_const = constant_input(node)
    if add_const is None or not per_channel(add_const[1], c):
        return None
    mul = prod.get(node.inputs[1 - add_const[0]].name)
    if mul is None or mul.op != "Mul" or len(cons.get(mul.outputs[0].name, [])) != 1:
        return None
    mul_const = constant_input(mul)
    if mul_const is None or not per_channel(mul_const[1], c):
        return None
    if sum(1 for n in cons.get(mul_const[1].name, [])) != 1 or len(cons.get(add_const[1].name, [])) != 1:
        return None  # a constant shared with another node cannot change
    return mul_const[1].name, add_const[1].name


def _value_layer(layers: list[str], nodes: dict[str, str], values: dict[str, str]) -> str | None:
    """The attention's value projection, when the group is that attention's output linear."""
    value = values.get(layers[0]) if len(layers) == 1 else None
    return value if value in nodes else None
