"""torch -> FP ONNX with static shapes (CFG batch 2), and the exact map from each calibrated
nn.Linear to its ONNX MatMul/Gemm node and weight initializer.

A per-step model bakes its timestep in as a constant, so the exporter's constant folding removes
the timestep-embedding / adaLN path that depends on t alone.
"""

from __future__ import annotations

import logging
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import numpy_helper
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
    timestep: int | None  # baked-in timestep of a per-step model, None if it is an input


class _FixedStep(nn.Module):
    """The denoiser with its timestep as a constant (per-step model)."""

    def __init__(self, denoiser: nn.Module, timestep: int, batch: int) -> None:
        super().__init__()
        self.denoiser = denoiser
        self.register_buffer("t", torch.full((batch,), timestep, dtype=torch.long))

    def forward(self, latents: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        return self.denoiser(latents, self.t, cond)


def scope_of(layer: str) -> str:
    """ONNX name scope of a module path: transformer_blocks.0.ff.net.2 -> /transformer/transformer_blocks.0/ff/net.2."""
    parts: list[str] = []
    for piece in layer.split("."):
        if piece.isdigit() and parts:
            parts[-1] += "." + piece
        else:
            parts.append(piece)
    return "/transformer/" + "/".join(parts)


def export_fp(adapter: ModelAdapter, layers: list[str], timestep: int | None) -> FPExport:
    """Export the FP denoiser for batch 2 (cond + uncond) and bind the given linears.

    Args:
        adapter: the model.
        layers: module names of the calibrated linears to bind.
        timestep: bake this timestep in (per-step model), or None to keep it an input.

    Raises:
        QexportError: a calibrated layer has no MatMul/Gemm with its weights in the graph.
    """
    denoiser = adapter.denoiser().float()
    x, t, cond = adapter.example_inputs(batch=2)
    if timestep is None:
        module: nn.Module = denoiser
        args: tuple[torch.Tensor, ...] = (x, t, cond)
        names = ["latents", "timestep", "cond"]
    else:
        module = _FixedStep(denoiser, timestep, 2)
        args, names = (x, cond), ["latents", "cond"]
    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        path = Path(tmp) / "fp.onnx"
        torch.onnx.export(
            module.eval(),
            args,
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
    return FPExport(model=model, input_names=names, bindings=bindings, timestep=timestep)


def with_timestep(fp: FPExport, timestep: int | None) -> FPExport:
    """A per-step variant: the `timestep` input becomes a constant [t, t] (folded by _prepare)."""
    if timestep is None:
        return fp
    model = onnx.ModelProto()
    model.CopyFrom(fp.model)
    t_input = next(i for i in model.graph.input if i.name == "timestep")
    model.graph.input.remove(t_input)
    model.graph.initializer.append(numpy_helper.from_array(np.full((2,), timestep, dtype=np.int64), "timestep"))
    names = [n for n in fp.input_names if n != "timestep"]
    return FPExport(model=model, input_names=names, bindings=fp.bindings, timestep=timestep)


STUB_BYTES = 1024  # initializers this large enter shape inference as dtype + dims only


def _data_bytes(init: onnx.TensorProto) -> int:
    if init.HasField("raw_data"):
        return len(init.raw_data)
    return sum(len(getattr(init, f)) for f in ("float_data", "int32_data", "int64_data", "double_data", "uint64_data"))


def infer_shapes(model: onnx.ModelProto) -> onnx.ModelProto:
    """ONNX shape inference, in place; returns model.

    Inference runs on a skeleton whose large initializers carry only their dtype and dims (shape
    inference reads no weight values), so no weight is copied and a model over protobuf's 2 GB
    limit needs no detour through files.
    """
    skeleton = onnx.ModelProto()
    skeleton.ir_version = model.ir_version
    skeleton.opset_import.extend(model.opset_import)
    skeleton.functions.extend(model.functions)
    graph, src = skeleton.graph, model.graph
    graph.name = src.name
    for part in ("node", "input", "output", "value_info", "sparse_initializer"):
        getattr(graph, part).extend(getattr(src, part))
    for init in src.initializer:
        if _data_bytes(init) < STUB_BYTES:
            graph.initializer.append(init)
            continue
        stub = graph.initializer.add()
        stub.name, stub.data_type = init.name, init.data_type
        stub.dims.extend(init.dims)
        stub.data_location = onnx.TensorProto.EXTERNAL
        entry = stub.external_data.add()
        entry.key, entry.value = "location", "shape-only"
    inferred = onnx.shape_inference.infer_shapes(skeleton).graph
    del src.value_info[:]
    src.value_info.extend(inferred.value_info)
    del src.output[:]
    src.output.extend(inferred.output)
    return model


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
