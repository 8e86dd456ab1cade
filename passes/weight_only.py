"""Weight-only int8 for the layers a build keeps in float (adaLN modulation, embedders, caption and
output projections, label tables): each weight stored as int8 per output channel (symmetric,
[-127, 127]) and widened by Cast and a Mul by its scale before its float MatMul, Gemm or Gather
reads it (constants the runtime folds when it loads the model), so the file holds
about one byte per parameter while activations and the computation stay float. The torch
simulation rounds the same weights (``rounded``), so verification compares like with like.
Quantized linears and every other constant are left alone."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from qexport.passes.graph import const, consumers
from qexport.passes.rewrite import KeptBinding, PassConfig
from qexport.targets.profile import TargetProfile

INT8_MAX = 127  # symmetric: q in [-127, 127]
MIN_ELEMENTS = 1024  # smaller weights stay float32 (their Cast, Mul and scale would cost more than they save)


def quantize(w: np.ndarray, axis: int) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric int8 per channel along `axis`: q = round(w / s) in [-127, 127] with s = max|w| / 127
    over the channel (1 for an all-zero channel), so |q·s − w| ≤ s/2; returns (q, s)."""
    others = tuple(a for a in range(w.ndim) if a != axis)
    amax = np.abs(w).max(axis=others)
    scale = np.where(amax > 0, amax / INT8_MAX, 1.0).astype(np.float32)
    shape = [-1 if a == axis else 1 for a in range(w.ndim)]
    q = np.clip(np.rint(w / scale.reshape(shape)), -INT8_MAX, INT8_MAX).astype(np.int8)
    return q, scale


def rounded(w: np.ndarray, axis: int) -> np.ndarray:
    """w as its int8 storage gives it back (Mul(Cast(q), s)): q · s in float32."""
    q, scale = quantize(np.asarray(w, dtype=np.float32), axis)
    shape = [-1 if a == axis else 1 for a in range(w.ndim)]
    return q.astype(np.float32) * scale.reshape(shape)


def weight_axis(node: gs.Node) -> int | None:
    """The output-channel axis of the weight `node` reads (MatMul W^T: 1; Gemm: 0 with transB;
    Gather: the table's rows, 0), or None where the node is no plain linear or lookup."""
    attrs = node.attrs
    if node.op == "MatMul":
        return 1
    if node.op == "Gemm" and not attrs.get("transA", 0) and attrs.get("alpha", 1.0) == attrs.get("beta", 1.0) == 1.0:
        return 0 if attrs.get("transB", 0) else 1
    if node.op == "Gather" and attrs.get("axis", 0) == 0:
        return 0
    return None


def surviving(graph: gs.Graph, kept: dict[str, KeptBinding]) -> list[str]:
    """The kept modules this graph still computes with a storable weight: its node reads the
    weight constant (a 2-D float32 one of MIN_ELEMENTS or more, read by that node alone). A per-step
    graph has folded the timestep's cone away, and K/V precompute moves the text's part out."""
    nodes = {n.name: n for n in graph.nodes}
    readers = consumers(graph)
    found = []
    for module, b in kept.items():
        node = nodes.get(b.node)
        if node is None or weight_axis(node) is None:
            continue
        w = node.inputs[0 if node.op == "Gather" else 1]
        if not isinstance(w, gs.Constant) or w.name != b.weight or len(readers.get(w.name, [])) != 1:
            continue
        values = np.asarray(w.values)
        if values.ndim == 2 and values.dtype == np.float32 and values.size >= MIN_ELEMENTS:
            found.append(module)
    return found


def store_float_weights(graph: gs.Graph, config: PassConfig, target: TargetProfile) -> gs.Graph:
    """Each weight-only module of the plan (RangePlan.weight_only) reads its weight as
    Mul(Cast(q int8), scale): constants only, which runtimes fold into the float weight when they
    load the model (onnxruntime: a float32 MatMul / Gemm / Gather as fast as the float model's,
    bit for bit q · s). A DequantizeLinear would not be folded: onnxruntime fuses it with a MatMul
    into MatMulNBits, which quantizes the activations dynamically (accuracy level 4, its default)
    or runs 35x slower than float32 (levels 0-1), measured at 2 x 768 x 4608."""
    if not config.plan.weight_only:
        return graph
    nodes = {n.name: n for n in graph.nodes}
    for module in config.plan.weight_only:
        node = nodes[config.kept[module].node]
        axis = weight_axis(node)
        assert axis is not None  # surviving() chose it
        index = 0 if node.op == "Gather" else 1
        q, scale = quantize(np.asarray(node.inputs[index].values), axis)
        shape = [-1 if a == axis else 1 for a in range(q.ndim)]
        wide = gs.Variable(f"{module}::fw_wide", dtype=np.float32, shape=list(q.shape))
        out = gs.Variable(f"{module}::fw", dtype=np.float32, shape=list(q.shape))
        graph.nodes.append(gs.Node("Cast", f"{module}::fw_cast", attrs={"to": onnx.TensorProto.FLOAT},
                                   inputs=[const(f"{module}::fw_q", q)], outputs=[wide]))  # fmt: skip
        graph.nodes.append(gs.Node("Mul", f"{module}::fw_scale", inputs=[wide, const(f"{module}::fw_s",
                                   scale.reshape(shape))], outputs=[out]))  # fmt: skip
        node.inputs[index] = out
    return graph
