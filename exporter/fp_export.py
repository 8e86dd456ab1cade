"""torch -> FP ONNX with static shapes (CFG batch 2), and the exact map from each calibrated
nn.Linear to its ONNX MatMul/Gemm node and weight initializer.

The graph is folded once with the timestep an input (``prepare``); a per-step graph fixes the
timestep and splices in the t-only path's values as constants (``StepGraphs``).
"""

from __future__ import annotations

import logging
import tempfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import onnxruntime as ort
import torch
from qexport.exporter.shapes import infer_graph_shapes
from qexport.passes.rewrite import KeptBinding
from qexport.passes.specialise import compact_constants, fix_inputs, fold_constants, input_cone
from torch import nn

from qexport.errors import QexportError
from qexport.models.adapter import ModelAdapter

log = logging.getLogger(__name__)

FOLD_ROUNDS = 8  # shape inference and folding in turn, until nothing more folds
OPSET = 21  # int4 / int16 QuantizeLinear / DequantizeLinear
IR_VERSION = 10  # onnxruntime 1.31 loads IR <= 13; onnx 1.23 would write 14
EXPORT_OPSET = 20  # what torch's TorchScript exporter writes; the graph is then stamped opset 21


@dataclass(frozen=True, kw_only=True)
class LinearBinding:
    """Where one calibrated nn.Linear lives in the ONNX graph."""

    layer: str
    node: str  # MatMul or Gemm node name
    weight: str  # initializer holding W^T, [in, out]
    in_features: int
    out_features: int


@dataclass(frozen=True, kw_only=True)
class FPGraph:
    """The FP export as a graph: its weights are views of the model's tensors."""

    graph: gs.Graph
    input_names: list[str]
    bindings: dict[str, LinearBinding]
    kept: dict[str, KeptBinding] = field(default_factory=dict)  # the float-kept linears and tables found


@dataclass(frozen=True, kw_only=True)
class FPExport:
    model: onnx.ModelProto
    input_names: list[str]
    bindings: dict[str, LinearBinding]


def scope_of(layer: str) -> str:
    """ONNX name scope of a module path: transformer_blocks.0.ff.net.2 -> /transformer/transformer_blocks.0/ff/net.2."""
    parts: list[str] = []
    for piece in layer.split("."):
        if piece.isdigit() and parts:
            parts[-1] += "." + piece
        else:
            parts.append(piece)
    return "/transformer/" + "/".join(parts)


def export_graph(adapter: ModelAdapter, layers: list[str]) -> FPGraph:
    """Export the FP denoiser (adapter.export_inputs: the built-ins' batch 2, cond + uncond), its
    timestep an input, and bind the given linears.

    The exporter writes the graph alone (no weights, nothing folded); each weight then enters
    the graph as a read-only numpy view of the model's own tensor, and a transposed weight as a
    transposed view, so the graph holds no second copy of the model. (The model's weights must not
    change in place while the graph lives; passes replace arrays, never write into them.)

    Args:
        adapter: the model.
        layers: module names of the calibrated linears to bind.

    Raises:
        QexportError: a calibrated layer has no MatMul/Gemm with its weights in the graph.
    """
    denoiser, inputs, names = adapter.export_inputs()
    denoiser = denoiser.float().eval()
    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        path = Path(tmp) / "fp.onnx"
        torch.onnx.export(denoiser, inputs, str(path), dynamo=False, opset_version=EXPORT_OPSET, input_names=names,
                          output_names=["output"], do_constant_folding=False, export_params=False)  # fmt: skip
        model = onnx.load(str(path))
    stamp(model)
    graph = gs.import_onnx(model)
    del model
    tensors = {**dict(denoiser.named_parameters(remove_duplicate=False)),
               **dict(denoiser.named_buffers(remove_duplicate=False))}  # fmt: skip
    for tensor in [t for t in graph.inputs if t.name not in names]:
        if tensor.name not in tensors:
            raise QexportError(f"the exported graph reads {tensor.name!r}, which is no tensor of the model")
        tensor.to_constant(_view(tensors[tensor.name]))
    graph.inputs = [t for t in graph.inputs if t.name in names]
    _lower_constant_nodes(graph)
    _transpose_views(graph)
    modules = dict(adapter.transformer.named_modules())
    bindings = {name: _bind(graph, name, modules[name]) for name in layers}
    return FPGraph(graph=graph, input_names=names, bindings=bindings, kept=bind_kept(graph, modules, set(layers)))


def _view(tensor: torch.Tensor) -> np.ndarray:
    """A read-only numpy view of a CPU tensor (a copy of one elsewhere)."""
    values = tensor.detach().cpu().numpy()
    values.flags.writeable = False
    return values


def _lower_constant_nodes(graph: gs.Graph) -> None:
    """Constant nodes become constant tensors (what folding would make of them)."""
    for node in [n for n in graph.nodes if n.op == "Constant" and len(n.outputs) == 1]:
        value = node.attrs.get("value")
        if isinstance(value, gs.Constant):
            node.outputs[0].to_constant(np.asarray(value.values))
            node.outputs.clear()
    graph.cleanup(remove_unused_graph_inputs=False)


def _transpose_views(graph: gs.Graph) -> None:
    """A Transpose of a constant becomes its transposed view (the exporter would have folded it
    into a transposed copy)."""
    for node in [n for n in graph.nodes if n.op == "Transpose" and isinstance(n.inputs[0], gs.Constant)]:
        values = np.asarray(node.inputs[0].values)
        view = values.transpose(node.attrs.get("perm", list(range(values.ndim))[::-1]))
        view.flags.writeable = False
        node.outputs[0].to_constant(view)
        node.outputs.clear()
    graph.cleanup(remove_unused_graph_inputs=False)


def export_fp(adapter: ModelAdapter, layers: list[str]) -> FPExport:
    """export_graph as an ONNX model (its weights copied into it)."""
    fp = export_graph(adapter, layers)
    model = gs.export_onnx(fp.graph)
    stamp(model)
    return FPExport(model=model, input_names=fp.input_names, bindings=fp.bindings)


def prepare_graph(fp: FPGraph) -> FPGraph:
    """Shape inference, then constant folding and compaction (passes.specialise), in place on
    fp's graph; every constant left read-only. The nodes keep the export's order (topological;
    toposort before running passes on a copy)."""
    graph = infer_graph_shapes(fp.graph)
    for _ in range(FOLD_ROUNDS):  # each round's folded shape ops make more shapes known to the next
        before = len(graph.nodes)
        graph = infer_graph_shapes(fold_constants(graph))
        if len(graph.nodes) == before:
            break
    compact_constants(graph)
    _read_only(graph)
    return FPGraph(graph=graph, input_names=fp.input_names, bindings=fp.bindings, kept=fp.kept)


def prepare(fp: FPExport) -> FPExport:
    """prepare_graph on an ONNX model."""
    prepared = prepare_graph(FPGraph(graph=gs.import_onnx(fp.model), input_names=fp.input_names, bindings=fp.bindings))
    model = gs.export_onnx(prepared.graph)
    stamp(model)
    return FPExport(model=model, input_names=fp.input_names, bindings=fp.bindings)


def load_graph(fp: FPExport) -> gs.Graph:
    """fp's graph with every constant loaded, read-only: copies of the graph (graph.copy()) share
    the arrays, and a pass that changed one in place instead of replacing it would raise."""
    return _read_only(gs.import_onnx(fp.model))


def _read_only(graph: gs.Graph) -> gs.Graph:
    for tensor in graph.tensors().values():
        if isinstance(tensor, gs.Constant):
            values = np.asarray(tensor.values)
            values.flags.writeable = False
            tensor.values = values
    return graph


class StepGraphs:
    """Per-step graphs of one prepared graph whose timestep is an input.

    The t-only cone (timestep embedding, adaLN-single, ...) is cut out once and runs in one
    onnxruntime session per build, node by node with the kernels onnxruntime's constant folding
    uses (no fusions, no pre-packed weights), so its values are bit-identical to folding the
    whole graph with t fixed. Each step splices them into a copy of the graph as constants
    (passes.specialise.fix_inputs); the graph's weights are shared, not copied.

    Raises:
        QexportError: the graph has no input `name` of static shape.
    """

    def __init__(self, graph: gs.Graph, name: str = "timestep") -> None:
        t = next((i for i in graph.inputs if i.name == name), None)
        if t is None or t.shape is None or t.dtype is None or not all(isinstance(d, int) for d in t.shape):
            raise QexportError(f"the FP graph has no input {name!r} of static shape to fix per step")
        self.graph, self.name, self.shape, self.dtype = graph, name, tuple(t.shape), np.dtype(t.dtype)
        cone = input_cone(graph, name)
        self.outputs = [o.name for o in cone.outputs]
        self.session = None
        if self.outputs:
            model = gs.export_onnx(cone)
            stamp(model)
            options = ort.SessionOptions()
            options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
            options.add_session_config_entry("session.disable_prepacking", "1")
            options.log_severity_level = 3  # onnxruntime's notes on the cone's Unsqueezes are not the user's
            self.session = ort.InferenceSession(model.SerializeToString(), options, ["CPUExecutionProvider"])

    def at(self, timestep: float) -> gs.Graph:
        """The graph with its timestep fixed (constants shared with self.graph)."""
        t = np.full(self.shape, timestep, dtype=self.dtype)
        values = {self.name: t}
        if self.session is not None:
            values.update(zip(self.outputs, self.session.run(self.outputs, {self.name: t}), strict=True))
        return fix_inputs(self.graph, values)


def stamp(model: onnx.ModelProto) -> None:
    """Opset 21 (int4 / int16 QDQ) and an IR version onnxruntime 1.31 loads."""
    for opset in model.opset_import:
        if opset.domain in ("", "ai.onnx"):
            opset.version = OPSET
    model.ir_version = IR_VERSION


def _bind(graph: gs.Graph, layer: str, module: nn.Module) -> LinearBinding:
    if not isinstance(module, nn.Linear):
        raise QexportError(f"calibrated layer {layer!r} is not an nn.Linear in this model")
    node = _linear_node(graph, layer, module)
    if node is None:
        raise QexportError(
            f"calibrated layer {layer!r} has no MatMul/Gemm with its weights under ONNX scope {scope_of(layer)!r}"
        )
    return LinearBinding(layer=layer, node=node.name, weight=node.inputs[1].name, in_features=module.in_features,
                         out_features=module.out_features)  # fmt: skip


def _scoped(graph: gs.Graph, module: str, ops: tuple[str, ...]) -> list[gs.Node]:
    """The nodes of these op types directly under the module's ONNX scope (which may sit under a
    wrapper's own: /denoiser/transformer/...)."""
    scope = scope_of(module) + "/"
    found = []
    for node in graph.nodes:
        at = node.name.find(scope)
        if node.op in ops and at >= 0 and "/" not in node.name[at + len(scope) :]:
            found.append(node)
    return found


def _linear_node(graph: gs.Graph, layer: str, module: nn.Linear) -> gs.Node | None:
    """The MatMul / Gemm computing the linear: under its scope, reading its weight as a constant."""
    weight_t = module.weight.detach().float().cpu().numpy().T
    for node in _scoped(graph, layer, ("MatMul", "Gemm")):
        if len(node.inputs) > 1 and isinstance(node.inputs[1], gs.Constant):
            w = np.asarray(node.inputs[1].values)
            w = w.T if node.op == "Gemm" and node.attrs.get("transB", 0) else w
            if w.shape == weight_t.shape and np.allclose(w, weight_t, rtol=1e-6, atol=1e-7):
                return node
    return None


def bind_kept(graph: gs.Graph, modules: dict[str, nn.Module], calibrated: set[str]) -> dict[str, KeptBinding]:
    """Every nn.Linear and nn.Embedding of the model that is not calibrated (kept in float) and that
    the graph computes from its own weight: its MatMul / Gemm, or its Gather reading the table."""
    kept = {}
    for name, module in modules.items():
        node, index = None, 1
        if isinstance(module, nn.Linear) and name not in calibrated:
            node = _linear_node(graph, name, module)
        elif isinstance(module, nn.Embedding):
            table = module.weight.detach().float().cpu().numpy()
            node = next((n for n in _scoped(graph, name, ("Gather",)) if isinstance(n.inputs[0], gs.Constant)
                         and np.array_equal(np.asarray(n.inputs[0].values), table)), None)  # fmt: skip
            index = 0
        if node is not None:
            kept[name] = KeptBinding(module=name, node=node.name, weight=node.inputs[index].name)
    return kept
