"""Cross-attention K/V precompute as graph surgery: find the quantized linears that read the
conditioning alone (the K/V projections of every cross-attention), and split a prepared FP graph
into the kv graph (conditioning -> those projections' outputs, run once per prompt) and the step
graph, which takes the projections' outputs as inputs. Leaves quantization to the other passes."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_graphsurgeon as gs
from qexport.passes.graph import constant_input, consumers, node_named, producers

COND = "cond"
ROW_OPS = ("Unsqueeze", "Squeeze", "Tile", "Expand", "Reshape", "Identity")


@dataclass(frozen=True, kw_only=True)
class KVLayer:
    """One projection of the conditioning, and where the graphs are cut around it."""

    layer: str
    node: str  # its MatMul
    output: str  # the projection's output (after its bias Add): the step graph's input from here on
    source: str  # the compact tensor the kv graph projects (before rows are replicated)
    chain: tuple[str, ...]  # nodes replicating rows from source to the MatMul's input (the step graph repeats them)
    in_features: int
    out_features: int


@dataclass(frozen=True, kw_only=True)
class KVSplit:
    layers: tuple[KVLayer, ...]

    @property
    def names(self) -> list[str]:
        return [kv.layer for kv in self.layers]


def conditioning_only(graph: gs.Graph, inputs: tuple[str, ...] = (COND,)) -> set[str]:
    """Names of the tensors computed from the given graph inputs and constants alone."""
    found = set(inputs)
    for node in graph.toposort().nodes:
        data = [t for t in node.inputs if t.name and not isinstance(t, gs.Constant)]
        if data and all(t.name in found for t in data):
            found.update(t.name for t in node.outputs)
    return found


def find_kv(graph: gs.Graph, nodes: dict[str, str]) -> KVSplit:
    """The quantized linears (layer -> MatMul node) whose input depends on the conditioning only.

    Rows the graph replicates before the projection (a caption repeated per frame) are traced back
    through shape-only nodes, so the kv graph projects each caption row once.
    """
    cond = conditioning_only(graph)
    prod, cons = producers(graph), consumers(graph)
    found = []
    for layer, name in nodes.items():
        matmul = node_named(graph, name)
        x, w = matmul.inputs[0], matmul.inputs[1]
        if x.name not in cond or not _static(x.shape) or not _static(w.shape):
            continue
        out = matmul.outputs[0]
        users = cons.get(out.name, [])
        if matmul.op == "MatMul" and len(users) == 1 and users[0].op == "Add" and constant_input(users[0]):
            out = users[0].outputs[0]
        n_in = int(x.shape[-1])
        n_out = int(out.shape[-1]) if _static(out.shape) else int(w.shape[-1])
        source, chain = x, []
        while matmul.op == "MatMul" and (node := prod.get(source.name)) is not None and _replicates(node, n_in):
            chain.append(node.name)
            source = node.inputs[0]
        found.append(KVLayer(layer=layer, node=name, output=out.name, source=source.name, chain=tuple(chain[::-1]),
                             in_features=n_in, out_features=n_out))  # fmt: skip
    return KVSplit(layers=tuple(found))


def kv_graph(graph: gs.Graph, split: KVSplit) -> gs.Graph:
    """Keep what computes the projections from `cond`: each reads its compact source, and its output
    becomes a graph output named after the layer (shapes are re-inferred by the caller)."""
    tensors = graph.tensors()
    outputs = []
    for kv in split.layers:
        node_named(graph, kv.node).inputs[0] = tensors[kv.source]
        for t in {node_named(graph, kv.node).outputs[0].name, kv.output}:
            tensors[t].shape = None
        y = tensors[kv.output]
        y.name, y.dtype = kv.layer, np.float32
        outputs.append(y)
    graph.inputs = [t for t in graph.inputs if t.name == COND]
    graph.outputs = outputs
    return graph.cleanup().toposort()


def step_graph(graph: gs.Graph, split: KVSplit) -> gs.Graph:
    """Replace each projection's output by a graph input named after the layer (its compact rows);
    the row replication between source and projection is repeated on that input. `cond` stays an
    input only where something else still reads it."""
    tensors = graph.tensors()
    cons = consumers(graph)
    for kv in split.layers:
        source, y = tensors[kv.source], tensors[kv.output]
        x = gs.Variable(kv.layer, dtype=np.float32, shape=[*source.shape[:-1], kv.out_features])
        graph.inputs.append(x)
        full = x
        for k, name in enumerate(kv.chain):
            node = node_named(graph, name)
            params = [_retarget(p, node.op, kv.in_features, kv.out_features, k) for p in node.inputs[1:]]
            last = k == len(kv.chain) - 1
            out = gs.Variable(
                f"{kv.layer}::kv_{'full' if last else k}", dtype=np.float32, shape=y.shape if last else None
            )
            graph.nodes.append(gs.Node(node.op, f"{kv.layer}::kv_{k}", dict(node.attrs), [full, *params], [out]))
            full = out
        for reader in cons.get(y.name, []):
            for i, t in enumerate(reader.inputs):
                if t is y:
                    reader.inputs[i] = full
        graph.outputs = [full if t is y else t for t in graph.outputs]
    graph.cleanup().toposort()
    used = {t.name for n in graph.nodes for t in n.inputs}
    graph.inputs = [t for t in graph.inputs if t.name != COND or COND in used]
    return graph


def matmul_macs(graph: gs.Graph) -> int:
    """Multiply-accumulates of the MatMul / Gemm nodes with static shapes."""
    total = 0
    for node in graph.nodes:
        if node.op in ("MatMul", "Gemm") and _static(node.outputs[0].shape) and _static(node.inputs[0].shape):
            a, out = node.inputs[0].shape, node.outputs[0].shape
            k = a[0] if node.op == "Gemm" and node.attrs.get("transA", 0) else a[-1]
            total += int(np.prod(out, dtype=np.int64)) * int(k)
    return total


def _static(shape: object) -> bool:
    if shape is None or isinstance(shape, str):
        return False
    dims = list(shape)  # type: ignore[call-overload]  # lists, tuples, protobuf containers (lazy constants)
    return len(dims) > 0 and all(isinstance(d, int) for d in dims)


def _values(t: gs.Tensor) -> np.ndarray | None:
    return np.asarray(t.values).reshape(-1) if isinstance(t, gs.Constant) else None


def _replicates(node: gs.Node, features: int) -> bool:
    """True when node only replicates or regroups rows of `features` channels (the last axis kept)."""
    if node.op not in ROW_OPS or not node.inputs or not node.outputs:
        return False
    x, y = node.inputs[0], node.outputs[0]
    if not (_static(x.shape) and _static(y.shape)) or x.shape[-1] != features or y.shape[-1] != features:
        return False
    if node.op == "Identity":
        return True
    p = _values(node.inputs[1]) if len(node.inputs) > 1 else None
    if p is None:
        return False
    if node.op in ("Unsqueeze", "Squeeze"):
        rank = len(y.shape) if node.op == "Unsqueeze" else len(x.shape)
        return all(int(a) % rank != rank - 1 for a in p)
    if node.op == "Tile":
        return int(p[-1]) == 1
    if node.op == "Expand":
        return int(p[-1]) in (1, features)
    return int(p[-1]) == features and 0 not in p  # Reshape: rows are contiguous blocks of the last axis


def _retarget(p: gs.Tensor, op: str, n_in: int, n_out: int, k: int) -> gs.Tensor:
    """The shape parameter of a replicating node, for rows of n_out instead of n_in channels."""
    values = _values(p)
    if values is None or op not in ("Reshape", "Expand") or n_in == n_out or int(values[-1]) != n_in:
        return p
    changed = np.asarray(p.values).copy()
    changed.reshape(-1)[-1] = n_out
    return gs.Constant(f"{p.name}::kv_{k}_{n_out}", changed)
