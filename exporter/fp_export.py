"""torch -> FP ONNX with static shapes (CFG batch 2), and the exact map from each calibrated
nn.Linear to its ONNX MatMul/Gemm node and weight initializer.

The graph is folded once with the timestep an input (``prepare``); a per-step graph fixes the
timestep and splices in the t-only path's values as constants (``StepGraphs``).
"""

from __future__ import annotations

import logging
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import onnxruntime as ort
import torch
from google.protobuf.message import EncodeError  # type: ignore[import-untyped]  # protobuf ships no stubs
from onnx import numpy_helper
from qexport.passes.specialise import compact_constants, fix_inputs, fold_constants, input_cone
from torch import nn

from qexport.errors import QexportError
from qexport.models.adapter import ModelAdapter

log = logging.getLogger(__name__)

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


def export_fp(adapter: ModelAdapter, layers: list[str]) -> FPExport:
    """Export the FP denoiser (adapter.export_inputs: the built-ins' batch 2, cond + uncond), its
    timestep an input, and bind the given linears.

    Args:
        adapter: the model.
        layers: module names of the calibrated linears to bind.

    Raises:
        QexportError: a calibrated layer has no MatMul/Gemm with its weights in the graph.
    """
    denoiser, inputs, names = adapter.export_inputs()
    denoiser = denoiser.float()
    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        path = Path(tmp) / "fp.onnx"
        torch.onnx.export(
            denoiser.eval(),
            inputs,
            str(path),
            dynamo=False,
            opset_version=EXPORT_OPSET,
            input_names=names,
            output_names=["output"],
            do_constant_folding=True,
        )
        model = onnx.load(str(path), load_external_data=True)
    stamp(model)
    modules = dict(adapter.transformer.named_modules())
    bindings = {name: _bind(model, name, modules[name]) for name in layers}
    return FPExport(model=model, input_names=names, bindings=bindings)


def prepare(fp: FPExport) -> FPExport:
    """Shape inference, then constant folding and compaction (passes.specialise); the nodes keep
    the export's order (topological; toposort before running passes on a copy)."""
    folded = gs.export_onnx(fold_constants(gs.import_onnx(infer_shapes(fp.model))))
    graph = compact_constants(gs.import_onnx(infer_shapes(folded)))  # more shapes are known after folding
    model = gs.export_onnx(graph)
    stamp(model)
    return FPExport(model=model, input_names=fp.input_names, bindings=fp.bindings)


def load_graph(fp: FPExport) -> gs.Graph:
    """fp's graph with every constant loaded, read-only: copies of the graph (graph.copy()) share
    the arrays, and a pass that changed one in place instead of replacing it would raise."""
    graph = gs.import_onnx(fp.model)
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
            self.session = ort.InferenceSession(model.SerializeToString(), options, ["CPUExecutionProvider"])

    def at(self, timestep: float) -> gs.Graph:
        """The graph with its timestep fixed (constants shared with self.graph)."""
        t = np.full(self.shape, timestep, dtype=self.dtype)
        values = {self.name: t}
        if self.session is not None:
            values.update(zip(self.outputs, self.session.run(self.outputs, {self.name: t}), strict=True))
        return fix_inputs(self.graph, values)


STUB_BYTES = 1024  # initializers this large enter shape inference as dtype + dims only


def _data_bytes(init: onnx.TensorProto) -> int:
    if init.HasField("raw_data"):
        return len(init.raw_data)
    return sum(len(getattr(init, f)) for f in ("float_data", "int32_data", "int64_data", "double_data", "uint64_data"))


def infer_shapes(model: onnx.ModelProto) -> onnx.ModelProto:
    """ONNX shape inference, in place; returns model.

    Inference runs on a skeleton whose large initializers and node tensor attributes (a Constant's
    value, any other node's tensor) carry only their dtype and dims (shape inference reads no weight
    values), so no weight is copied and a model over protobuf's 2 GB limit needs no detour through files.

    Raises:
        QexportError: the skeleton itself is over the limit (its largest parts named).
    """
    skeleton = onnx.ModelProto()
    skeleton.ir_version = model.ir_version
    skeleton.opset_import.extend(model.opset_import)
    skeleton.functions.extend(model.functions)
    graph, src = skeleton.graph, model.graph
    graph.name = src.name
    for part in ("input", "output", "value_info", "sparse_initializer"):
        getattr(graph, part).extend(getattr(src, part))
    for node in src.node:
        heavy = {a.name for a in node.attribute if a.HasField("t") and _data_bytes(a.t) >= STUB_BYTES}
        if not heavy:
            graph.node.append(node)
            continue
        light = graph.node.add()
        light.op_type, light.name, light.domain = node.op_type, node.name, node.domain
        light.input.extend(node.input)
        light.output.extend(node.output)
        for attribute in node.attribute:
            if attribute.name in heavy:
                _stub(light.attribute.add(), attribute)
            else:
                light.attribute.append(attribute)
    for init in src.initializer:
        if _data_bytes(init) < STUB_BYTES:
            graph.initializer.append(init)
            continue
        _stub_tensor(graph.initializer.add(), init)
    try:
        inferred = onnx.shape_inference.infer_shapes(skeleton).graph
    except EncodeError as err:
        raise QexportError(f"shape inference: the weightless skeleton is over 2 GB; {_largest(skeleton)}") from err
    del src.value_info[:]
    src.value_info.extend(inferred.value_info)
    del src.output[:]
    src.output.extend(inferred.output)
    return model


def _largest(model: onnx.ModelProto, n: int = 5) -> str:
    """The n largest nodes of a graph by serialized size, as 'name (op): bytes'."""
    sizes = sorted(((node.ByteSize(), node.name, node.op_type) for node in model.graph.node), reverse=True)[:n]
    return "largest nodes: " + ", ".join(f"{name} ({op}): {size} B" for size, name, op in sizes)


def _stub_tensor(stub: onnx.TensorProto, tensor: onnx.TensorProto) -> None:
    """stub := tensor's name, dtype and dims, its data marked external (never read)."""
    stub.name, stub.data_type = tensor.name, tensor.data_type
    stub.dims.extend(tensor.dims)
    stub.data_location = onnx.TensorProto.EXTERNAL
    entry = stub.external_data.add()
    entry.key, entry.value = "location", "shape-only"


def _stub(stub: onnx.AttributeProto, attribute: onnx.AttributeProto) -> None:
    stub.name, stub.type = attribute.name, attribute.type
    _stub_tensor(stub.t, attribute.t)


def stamp(model: onnx.ModelProto) -> None:
    """Opset 21 (int4 / int16 QDQ) and an IR version onnxruntime 1.31 loads."""
    for opset in model.opset_import:
        if opset.domain in ("", "ai.onnx"):
            opset.version = OPSET
    model.ir_version = IR_VERSION


def _bind(model: onnx.ModelProto, layer: str, module: nn.Module) -> LinearBinding:
    if not isinstance(module, nn.Linear):
        raise QexportError(f"calibrated layer {layer!r} is not an nn.Linear in this model")
    scope = scope_of(layer) + "/"
    inits = {i.name: i for i in model.graph.initializer}
    weight_t = module.weight.detach().float().numpy().T
    for node in model.graph.node:
        at = node.name.find(scope)  # the scope may sit under a wrapper's own (/denoiser/transformer/...)
        if node.op_type not in ("MatMul", "Gemm") or at < 0 or "/" in node.name[at + len(scope) :]:
            continue
        if len(node.input) > 1 and node.input[1] in inits:
            w = numpy_helper.to_array(inits[node.input[1]])
            if node.op_type == "Gemm":
                trans_b = next((a.i for a in node.attribute if a.name == "transB"), 0)
                w = w.T if trans_b else w
            if w.shape == weight_t.shape and np.allclose(w, weight_t, rtol=1e-6, atol=1e-7):
                return LinearBinding(
                    layer=layer,
                    node=node.name,
                    weight=node.input[1],
                    in_features=module.in_features,
                    out_features=module.out_features,
                )
    raise QexportError(f"calibrated layer {layer!r} has no MatMul/Gemm with its weights under ONNX scope {scope!r}")
