"""Dynamic activations (ViDiT-Q's baseline): each quantized linear's input is quantized at run time
from its own range instead of a calibrated one. Not NPU-static — an NPU fixes every scale at build
time — so it is a reference row beside the static methods, built for a runtime that computes
scales (onnxruntime's CPU provider).

The static-quantization paper compares every static method with ViDiT-Q's token-wise dynamic
quantization (its Tables I-III, rows "Dynamic [4]"). Both forms here use the asymmetric rule of the
ONNX operator DynamicQuantizeLinear on a grid of ``qmax = 2^bits - 1``:

    lo = min(0, min x)    hi = max(0, max x)    s = (hi - lo) / qmax
    z = clip(round(-lo / s), 0, qmax)          x̂ = (clip(round(x / s) + z, 0, qmax) - z) · s

- ``token``: min and max over each token's channels (the last axis), so s and z have one value per
  token; emitted as a blocked QuantizeLinear / DequantizeLinear pair (opset 21, ``block_size`` = the
  channels) whose scale and zero point are computed in the graph. Any width 2..8.
- ``tensor``: one range over the whole input: ``DynamicQuantizeLinear`` (8 bits only), which
  onnxruntime fuses with the weight's DequantizeLinear and the MatMul into an integer kernel.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any, ClassVar, Literal

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from qexport.passes.graph import Appender, node_named
from qexport.passes.rangeplan import LayerStep, QuantConfig, RangePlan
from qexport.passes.rewrite import PassConfig
from qexport.passes.techniques.base import GraphPass, Shape, Technique
from qexport.targets.profile import TargetProfile

from qexport.errors import QexportError

GRANULARITIES = ("token", "tensor")


def _per_token(graph: gs.Graph, x: gs.Tensor, prefix: str, qmax: int) -> tuple[gs.Tensor, gs.Tensor, gs.Tensor]:
    """Nodes quantizing x per token (DynamicQuantizeLinear's rule over the last axis): the codes
    (uint8), each token's scale [..., 1] (float) and zero point [..., 1] (int32)."""
    node = Appender(graph, f"{prefix}::dyn_")
    last, zero, top = node.const("axis", [-1], np.int64), node.const("nought", 0.0), node.const("qmax", float(qmax))
    lo = node("Min", "lo", [node("ReduceMin", "min", [x, last], keepdims=1), zero])
    hi = node("Max", "hi", [node("ReduceMax", "max", [x, last], keepdims=1), zero])
    width = node("Div", "width", [node("Sub", "span", [hi, lo]), top])
    scale = node("Max", "scale", [width, node.const("tiny", np.finfo(np.float32).tiny)])
    ratio = node("Div", "ratio", [node("Neg", "neg_lo", [lo]), scale])
    point = node("Clip", "point", [node("Round", "point_round", [ratio]), zero, top])
    rounded = node("Round", "rounded", [node("Div", "scaled", [x, scale])])
    level = node("Clip", "level", [node("Add", "shifted", [rounded, point]), zero, top])
    codes = node("Cast", "codes", [level], dtype=np.uint8, to=onnx.TensorProto.UINT8)
    return codes, scale, node("Cast", "zero_point", [point], dtype=np.int32, to=onnx.TensorProto.INT32)


def _integer_linear(graph: gs.Graph, matmul: gs.Node, layer: str, codes: gs.Tensor, scale: gs.Tensor,
                    point: gs.Tensor, w_q: gs.Constant, w_scale: np.ndarray) -> None:  # fmt: skip
    """matmul's output as (MatMulInteger(codes, W_q) - z · colsum(W_q)) · s · s_w: integer products of
    the token codes and the symmetric weight, the zero point's term subtracted in int32."""
    node = Appender(graph, f"{layer}::dyn_")
    colsum = node.const("colsum", np.asarray(w_q.values, dtype=np.int64).sum(axis=0), np.int32)
    products = node("MatMulInteger", "products", [codes, w_q], dtype=np.int32)
    centred = node("Sub", "centred", [products, node("Mul", "offset", [point, colsum], dtype=np.int32)], dtype=np.int32)
    real = node("Mul", "per_token", [node("Cast", "real", [centred], to=onnx.TensorProto.FLOAT), scale])
    out = matmul.outputs[0]
    matmul.outputs = []  # the MatMul and its weight's DequantizeLinear are left unread: cleanup drops them
    rescale = [real, node.const("w_scale", w_scale)]
    graph.nodes.append(gs.Node("Mul", f"{layer}::dyn_out_op", inputs=rescale, outputs=[out]))


def make_dynamic(graph: gs.Graph, config: PassConfig, target: TargetProfile) -> gs.Graph:
    """Replace each dynamic group's static QuantizeLinear -> DequantizeLinear by its run-time form:
    per tensor DynamicQuantizeLinear feeding the same DequantizeLinear; per token the codes computed
    in the graph and each linear an explicit MatMulInteger (see _integer_linear)."""
    for g in config.groups:
        lp = config.plan.layers[g.layers[0]]
        if lp.dynamic is None:
            continue
        quant = node_named(graph, f"{g.tensor}::a_quant")
        dequant = node_named(graph, f"{g.tensor}::a_dequant")
        x, q = quant.inputs[0], quant.outputs[0]
        if lp.dynamic == "tensor":
            scale = gs.Variable(f"{g.tensor}::dyn_scale", dtype=np.float32)
            zero = gs.Variable(f"{g.tensor}::dyn_zero_point", dtype=np.uint8)
            quant.op, quant.attrs, quant.inputs, quant.outputs = "DynamicQuantizeLinear", {}, [x], [q, scale, zero]
            dequant.inputs = [q, scale, zero]
            continue
        codes, scale, point = _per_token(graph, x, g.tensor, lp.a_grid.qmax)
        for layer in g.layers:
            matmul = node_named(graph, config.nodes[layer])
            if matmul.op != "MatMul" or not matmul.inputs[1].inputs:
                raise ValueError(f"{layer}: per-token dynamic activations need a MatMul reading a dequantized weight")
            w_q = matmul.inputs[1].inputs[0].inputs[0]  # MatMul <- DequantizeLinear(w_q, scale, zero)
            _integer_linear(graph, matmul, layer, codes, scale, point, w_q, config.plan.layers[layer].w_scale)
    return graph


@dataclass(frozen=True, kw_only=True)
class DynamicActivations(Technique):
    kind = "dynamic_activations"
    summary = "ViDiT-Q's baseline: each linear's input quantized at run time, per token or per tensor (not NPU-static)"
    excludes = ("activation_observer", "attention", "precompute_kv", "online_rotation", "mixed_precision", "lowrank")
    rewrites: ClassVar[Mapping[str, GraphPass]] = {"dynamic": make_dynamic}

    granularity: Literal["token", "tensor"] = "token"

    def check(self, shape: Shape) -> None:
        super().check(shape)
        smoothing = shape.techniques.get("smoothquant")
        if smoothing is not None and getattr(smoothing, "alpha", None) == "layer":
            raise QexportError("smoothquant.alpha=layer scores each group with its static quantizer; with "
                               "dynamic_activations use a fixed alpha or auto")  # fmt: skip
        if shape.a_bits > 8:
            raise QexportError(f"technique 'dynamic_activations' quantizes into 8-bit containers; bits.activations "
                               f"must be 8 or less, got {shape.a_bits}")  # fmt: skip
        if self.granularity == "tensor" and shape.a_bits != 8:
            raise QexportError(f"dynamic_activations.granularity=tensor is DynamicQuantizeLinear, 8-bit only; "
                               f"bits.activations is {shape.a_bits} (use granularity=token)")  # fmt: skip

    @classmethod
    def plan_layer(cls, step: LayerStep) -> None:
        chosen = step.rng.config.techniques.get(cls.kind)
        if chosen is None:
            return
        step.lp.dynamic = chosen.granularity
        if chosen.granularity == "token":  # MatMulInteger multiplies 8-bit operands: 4-bit codes in int8
            step.lp.w_grid = replace(step.lp.w_grid, storage=step.rng.target.weight_type(8))

    @classmethod
    def record(cls, config: QuantConfig, plans: list[RangePlan]) -> dict[str, Any]:
        chosen = config.techniques.get(cls.kind)
        return {} if chosen is None else {cls.kind: chosen.granularity}  # absent: a build's record as before

    @classmethod
    def describe(cls, quantization: Mapping[str, Any]) -> list[str]:
        granularity = quantization.get(cls.kind)
        if granularity is None:
            return []
        return [f"  dynamic    activations quantized at run time, per {granularity} (not NPU-static: a reference)"]
