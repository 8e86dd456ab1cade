"""Specialisation of the FP graph: fold every constant-only path, then shrink constants that
folding materialised with repeated rows (the modulation vector repeated per frame or per patch)
back to broadcast size. A per-step model is the folded graph with its timestep fixed: the t-only
cone is evaluated once per step and spliced in as constants, so per-step models differ by a few
small vectors only. Leaves every node that reads a non-constant input alone."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx import helper
from qexport.passes.gptq import digest
from qexport.passes.graph import consumers

from qexport.errors import QexportError

ELEMENTWISE = ("Add", "Mul", "Sub", "Div")


FOLD_BYTES = 1 << 30
"""Constant bytes one in-memory folding evaluation may take in: graphsurgeon serializes the
constant-only part of the graph for onnxruntime, and protobuf refuses a message over 2 GiB. A
full-size video model's rotary tables alone pass that (Wan2.1-1.3B at 480x832, 17 frames: 2.9 GB),
so such a graph's constant-only part is written to a folder, its constants as external data, and
evaluated from there in one session."""

NO_FOLD = ("QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear")  # as graphsurgeon's folding
EXTERNAL_BYTES = 1024  # constants this large go to the folder as external data
SHARE_BYTES = 1 << 20
"""Folded values at least this large that a graph computes more than once by the same path (the
same ops on equal constants) become one constant that all their readers share. Wan's rotary
embedding writes each block's rotated query and key through ScatterND, whose int64 indices
([1, tokens, heads, head size / 2, 4]) are [1, 7800, 12, 64, 4], 192 MB each, at 480x832 and 17
frames: four a block, 30 blocks, 23 GB when each block's are folded apart, 768 MB shared."""
HASHED_BYTES = 1 << 20  # constants up to this size are compared by value; larger ones by identity


def fold_constants(graph: gs.Graph, limit: int = FOLD_BYTES, share: int = SHARE_BYTES) -> gs.Graph:
    """Fold every constant-only path. The nodes left keep their order (the exporter's, which is
    topological), so a graph cut from this one sorts (toposort) as if it had been folded whole.

    A path that cannot be evaluated is an error, not a graph left unfolded: the shape paths left
    behind keep onnxruntime from fusing the linears after them into integer kernels.

    Args:
        graph: the graph.
        limit: the constant bytes above which the constant-only part is evaluated from a folder
            (constants as external data) instead of serialized in memory.
        share: in that evaluation, values this large computed more than once by the same path
            are evaluated once and shared (SHARE_BYTES).
    """
    import onnxruntime as ort

    # graphsurgeon's folding sessions take onnxruntime's default logger: its notes on the
    # Unsqueezes it cannot remove (hundreds a model) are not the user's
    ort.set_default_logger_severity(3)
    large = foldable_bytes(graph) > limit
    try:
        if large:  # graphsurgeon's shape folding alone, then one evaluation from a folder
            graph.fold_constants(error_ok=False, should_exclude_node=lambda node: True).cleanup()
            _evaluate_from_folder(graph, share)
        else:
            graph.fold_constants(error_ok=False)
    except Exception as err:  # onnxruntime's or protobuf's, whatever the op
        raise QexportError(f"constant folding of the exported graph failed: {type(err).__name__}: "
                           f"{str(err).splitlines()[0] if str(err) else ''}; the op is not one onnxruntime "
                           "evaluates, or the constant part is too large to serialize") from err  # fmt: skip
    return graph.cleanup()


def constant_part(graph: gs.Graph) -> tuple[list[gs.Node], list[gs.Tensor]]:
    """The nodes that read constants only (directly or through other such nodes; graph in
    topological order), and their outputs that the rest of the graph or its outputs read."""
    known: set[str] = {name for name, t in graph.tensors().items() if isinstance(t, gs.Constant)}
    nodes = []
    for node in graph.nodes:
        if not node.outputs or node.op in NO_FOLD or any(isinstance(v, gs.Graph) for v in node.attrs.values()):
            continue
        if all(t.name in known for t in node.inputs if not t.is_empty()):
            nodes.append(node)
            known.update(t.name for t in node.outputs)
    inside = {id(n) for n in nodes}
    graph_outputs = {t.name for t in graph.outputs}
    frontier: dict[str, gs.Tensor] = {}
    for node in nodes:
        for t in node.outputs:
            if t.name in graph_outputs or any(id(c) not in inside for c in t.outputs):
                frontier[t.name] = t
    return nodes, list(frontier.values())


def path_keys(nodes: list[gs.Node]) -> dict[str, Any]:
    """A key per output of these nodes (topological order) that is equal only where two outputs are
    the same op path on equal constants: constants up to HASHED_BYTES by value, larger ones by
    identity (two large weights are never taken for equal)."""
    keys: dict[str, Any] = {}

    def key(value: object) -> Any:
        if isinstance(value, gs.Constant):
            if value.name in keys:
                return keys[value.name]
            if _nbytes(value) > HASHED_BYTES:
                return ("constant", id(value))
            return digest(np.asarray(value.values))
        if isinstance(value, gs.Tensor):
            return keys.get(value.name, ("tensor", value.name))
        if isinstance(value, np.ndarray):
            return digest(value)
        return repr(value)

    for node in nodes:
        attrs = tuple(sorted((name, key(v)) for name, v in node.attrs.items()))
        inputs = tuple(None if t.is_empty() else key(t) for t in node.inputs)
        own = (node.op, node.domain, attrs, inputs)
        for i, t in enumerate(node.outputs):
            keys[t.name] = (own, i)
    return keys


def _first_alike(graph: gs.Graph, nodes: list[gs.Node], frontier: list[gs.Tensor]) -> dict[str, gs.Tensor]:
    """Frontier tensors that an earlier frontier tensor computes by the same path: name -> that
    earlier tensor (graph outputs excluded)."""
    keys = path_keys(nodes)
    outputs = {o.name for o in graph.outputs}
    first: dict[Any, gs.Tensor] = {}
    alike: dict[str, gs.Tensor] = {}
    for t in frontier:
        if t.name not in outputs and (same_as := first.setdefault(keys[t.name], t)) is not t:
            alike[t.name] = same_as
    return alike


def _evaluate_from_folder(graph: gs.Graph, share: int = SHARE_BYTES) -> None:
    """Replace the outputs of graph's constant-only part by their values: the part (a copy, its
    arrays shared) written to a temporary folder with its constants as external data, so no
    protobuf message holds them, and run once by onnxruntime from there. Large values the part
    computes more than once by the same path are computed once, and their readers share them."""
    import onnxruntime as ort

    nodes, frontier = constant_part(graph)
    if not frontier:
        return
    alike = _first_alike(graph, nodes, frontier)
    unique = [t for t in frontier if t.name not in alike]
    part = gs.Graph(
        nodes=nodes,
        outputs=unique,
        opset=graph.opset,
        import_domains=graph.import_domains,
        ir_version=graph.ir_version or 10,
    ).copy()  # onnxruntime reads IR <= 13
    part.cleanup()  # the paths of the values shared away
    with tempfile.TemporaryDirectory(prefix="qexport-fold-") as tmp:
        folder = Path(tmp)
        for i, tensor in enumerate(t for t in part.tensors().values() if isinstance(t, gs.Constant)):
            values = np.asarray(tensor.values)
            if values.nbytes < EXTERNAL_BYTES:
                continue
            np.ascontiguousarray(values).tofile(folder / f"c{i}.bin")
            stub = onnx.TensorProto()
            stub.name, stub.data_type = tensor.name, helper.np_dtype_to_tensor_dtype(values.dtype)
            stub.dims.extend(values.shape)
            stub.data_location = onnx.TensorProto.EXTERNAL
            entry = stub.external_data.add()
            entry.key, entry.value = "location", f"c{i}.bin"
            tensor._values = gs.ir.tensor.LazyValues(stub)  # exported as the stub (no array copy)
        onnx.save(gs.export_onnx(part, do_type_check=False), folder / "part.onnx")
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        session = ort.InferenceSession(str(folder / "part.onnx"), options, providers=["CPUExecutionProvider"])
        values = session.run([t.name for t in unique], {})
        del session
    for tensor, value in zip(unique, values, strict=True):
        tensor.to_constant(np.asarray(value))
        tensor.inputs.clear()
    for t in frontier:
        if t.name not in alike:
            continue
        first = alike[t.name]
        if first.values.nbytes < share:  # small: its own constant, as if evaluated apart
            t.to_constant(np.array(first.values))
            t.inputs.clear()
            continue
        for reader in list(t.outputs):  # large: its readers read the first one
            for k, read in enumerate(reader.inputs):
                if read is t:
                    reader.inputs[k] = first


def foldable_bytes(graph: gs.Graph) -> int:
    """Bytes of the constants that feed constant-only nodes: what one folding evaluation serializes."""
    taken = {t.name: t for node in constant_part(graph)[0] for t in node.inputs if isinstance(t, gs.Constant)}
    return sum(_nbytes(t) for t in taken.values())


def _nbytes(tensor: gs.Constant) -> int:
    """A constant's size from its shape and type, without loading values kept in external data."""
    dtype = tensor.dtype  # a numpy type, or an ONNX type number where numpy has none (bfloat16)
    itemsize = np.dtype(helper.tensor_dtype_to_np_dtype(dtype) if isinstance(dtype, int) else dtype).itemsize
    return int(np.prod(tensor.shape, dtype=np.int64)) * itemsize


def _aligned(shape: tuple[int, ...], rank: int) -> tuple[int, ...]:
    return (1,) * (rank - len(shape)) + tuple(shape)


def compact_constants(graph: gs.Graph, names: set[str] | None = None) -> gs.Graph:
    """Collapse axes along which a constant repeats, where broadcasting gives the same result.

    Args:
        graph: the graph, shapes inferred.
        names: look at these constants only (None: all).
    """
    cons = consumers(graph)
    for tensor in list(graph.tensors().values()):
        if isinstance(tensor, gs.Constant) and (names is None or tensor.name in names):
            _compact(tensor, cons.get(tensor.name, []))
    return graph


def _compact(tensor: gs.Constant, users: list[gs.Node]) -> None:
    values = np.asarray(tensor.values)
    if values.ndim == 0 or values.size < 2 or not users or any(n.op not in ELEMENTWISE for n in users):
        return
    shapes = []
    for node in users:
        other = next((t for t in node.inputs if t is not tensor), None)
        if other is None or other.shape is None or any(not isinstance(d, int) for d in other.shape):
            return
        shapes.append(tuple(other.shape))
    rank = max(values.ndim, *(len(s) for s in shapes))
    full = _aligned(values.shape, rank)
    others = [_aligned(s, rank) for s in shapes]
    compact = values.reshape(full)
    for axis in range(rank):
        size = compact.shape[axis]
        if size > 1 and all(o[axis] == full[axis] for o in others):
            first = np.take(compact, [0], axis=axis)
            if np.array_equal(compact, np.broadcast_to(first, compact.shape)):
                compact = first
    if compact.size < values.size:
        tensor.values = np.ascontiguousarray(compact)


def copy_graph(graph: gs.Graph) -> gs.Graph:
    """graph.copy() (new nodes and tensors, the constants' arrays shared) that keeps the producer
    fields, which onnx-graphsurgeon's copy drops."""
    copy = graph.copy()
    copy.producer_name, copy.producer_version = graph.producer_name, graph.producer_version
    return copy


def _cone(graph: gs.Graph, name: str) -> tuple[list[gs.Node], list[gs.Tensor]]:
    """The nodes whose inputs are constants or depend on input `name` alone (graph in topological
    order), and the frontier: their outputs that a node outside the cone or the graph's output reads."""
    only = {name}
    nodes = []
    for node in graph.nodes:
        inputs = [t for t in node.inputs if not t.is_empty()]
        if any(t.name in only for t in inputs) and all(isinstance(t, gs.Constant) or t.name in only for t in inputs):
            nodes.append(node)
            only.update(t.name for t in node.outputs)
    inside = {id(n) for n in nodes}
    graph_outputs = {t.name for t in graph.outputs}
    frontier = [
        t for n in nodes for t in n.outputs if t.name in graph_outputs or any(id(c) not in inside for c in t.outputs)
    ]
    return nodes, frontier


def input_cone(graph: gs.Graph, name: str) -> gs.Graph:
    """The part of a folded graph that depends on its input `name` alone, as its own graph: input
    `name`, outputs the cone's frontier (its tensors that nodes depending on other inputs read).
    A copy whose constants share their arrays with graph.

    Raises:
        KeyError: graph has no input `name`.
    """
    cone = graph.copy()
    t = next((i for i in cone.inputs if i.name == name), None)
    if t is None:
        raise KeyError(name)
    _, frontier = _cone(cone, name)
    cone.inputs, cone.outputs = [t], frontier
    return cone.cleanup()


def fix_inputs(graph: gs.Graph, values: dict[str, np.ndarray]) -> gs.Graph:
    """A copy of graph in which the named tensors (inputs, or the frontier of an input's cone) are
    constants: the nodes that produced them go, the named inputs too, and the constants whose
    readers changed are compacted again; the copy is then toposorted. Constants share their
    arrays with graph.

    Args:
        graph: a folded graph, shapes inferred, its nodes in topological order (fold_constants).
        values: tensor name -> its value.
    """
    step = copy_graph(graph)
    tensors = step.tensors()
    for name, value in values.items():
        tensors[name].to_constant(value)
        tensors[name].inputs.clear()
    step.inputs = [t for t in step.inputs if t.name not in values]
    read = [(n, [t.name for t in n.inputs if isinstance(t, gs.Constant)]) for n in step.nodes]
    step.cleanup()  # drops the nodes that computed the named tensors (and disconnects them)
    kept = {id(n) for n in step.nodes}
    changed = set(values).union(*(names for n, names in read if id(n) not in kept))
    return compact_constants(step, changed).toposort()
