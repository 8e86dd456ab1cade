"""Codebook weights (VQ4DiT): each linear's weight stored as indices into a small per-layer codebook
of d-dimensional vectors instead of uniform integers.

VQ4DiT (Deng et al., AAAI 2025) splits each weight into sub-vectors of d consecutive entries, fits a
codebook of k codewords by k-means and stores one index per sub-vector: log2(k) / d bits per weight
plus the codebook. It then calibrates the assignments against the model's output (candidate
assignment sets with softmax ratios), which is not implemented here: the codebook and assignments
are plain k-means on the (smoothed) weight, k = 2^(bits.weights · d).

A codebook is not an affine grid, so DequantizeLinear cannot express it. Emitted as plain ONNX:
``Gather(codebook [k, d], Cast(indices uint8 [in / d, out]))`` -> Transpose -> Reshape to W^T [in, out],
constants only, which a runtime folds into a float weight at load: the saving is in the file and
its transfer, and the linear runs as a float MatMul on the quantized activation (no integer kernel;
`verify` counts it emulated). An NPU that compiles the graph gets the same float weight.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from qexport.passes.graph import Appender, const, node_named
from qexport.passes.rangeplan import LayerStep, QuantConfig, RangePlan
from qexport.passes.rewrite import PassConfig
from qexport.passes.techniques.base import GraphPass, Shape, Technique
from qexport.targets.profile import TargetProfile

from qexport.errors import QexportError

ITERATIONS = 25  # Lloyd iterations of the k-means
CHUNK = 65536  # vectors per distance block (bounds the k-means' memory)


def vectors(w: np.ndarray, dim: int) -> np.ndarray:
    """W^T [in, out] as sub-vectors of `dim` consecutive input channels: [in / dim * out, dim]."""
    n, m = w.shape
    return w.reshape(n // dim, dim, m).transpose(0, 2, 1).reshape(-1, dim)


def _nearest(v: np.ndarray, codebook: np.ndarray) -> np.ndarray:
    c2 = (codebook * codebook).sum(axis=1)
    out = np.empty(len(v), dtype=np.int64)
    for start in range(0, len(v), CHUNK):
        block = v[start : start + CHUNK]
        out[start : start + CHUNK] = np.argmin(c2[None, :] - 2.0 * block @ codebook.T, axis=1)
    return out


def _seeded(v: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    """k-means++ seeding: each next codeword drawn with probability proportional to the squared
    distance to the nearest one drawn so far (k distinct vectors when v has k or more)."""
    chosen = [int(rng.integers(len(v)))]
    nearest = ((v - v[chosen[0]]) ** 2).sum(axis=1)
    for _ in range(k - 1):
        total = nearest.sum()
        pick = int(rng.choice(len(v), p=nearest / total)) if total > 0 else int(rng.integers(len(v)))
        chosen.append(pick)
        nearest = np.minimum(nearest, ((v - v[pick]) ** 2).sum(axis=1))
    return v[chosen].copy()


def kmeans(v: np.ndarray, k: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Codebook [k, d] (float32) and assignments of the vectors v [N, d]: Lloyd's k-means from a
    k-means++ seeding with a fixed seed; a codeword left without vectors keeps its place."""
    v = np.asarray(v, dtype=np.float64)
    unique = np.unique(v, axis=0)
    if len(unique) <= k:  # fewer distinct vectors than codewords: each is its own codeword
        codebook = np.zeros((k, v.shape[1]))
        codebook[: len(unique)] = unique
        return codebook.astype(np.float32), _nearest(v, codebook)
    codebook = _seeded(v, k, np.random.default_rng(seed))
    for _ in range(ITERATIONS):
        assign = _nearest(v, codebook)
        counts = np.bincount(assign, minlength=k)
        sums = np.zeros_like(codebook)
        np.add.at(sums, assign, v)
        filled = counts > 0
        moved = sums[filled] / counts[filled, None]
        if np.allclose(moved, codebook[filled]):
            break
        codebook[filled] = moved
    codebook = codebook.astype(np.float32)
    return codebook, _nearest(v, codebook.astype(np.float64))


def emit_codebooks(graph: gs.Graph, config: PassConfig, target: TargetProfile) -> gs.Graph:
    """Each codebook layer's weight DequantizeLinear replaced by Gather(codebook, Cast(indices)) ->
    Transpose -> Reshape: W^T [in, out], folded into a constant by the runtime at load."""
    for layer, lp in config.plan.layers.items():
        if lp.codebook is None:
            continue
        matmul = node_named(graph, config.nodes[layer])
        node = Appender(graph, f"{layer}::")
        index = node("Cast", "indices", [const(f"{layer}::w_q", lp.w_q)], np.int32, to=onnx.TensorProto.INT32)
        picked = node("Gather", "picked", [const(f"{layer}::codebook", lp.codebook), index])  # [in/d, out, d]
        turned = node("Transpose", "turned", [picked], perm=[0, 2, 1])
        shape = const(f"{layer}::w_shape", np.array(lp.shape, dtype=np.int64))  # W^T [in, out]
        matmul.inputs[1] = node("Reshape", "w_decoded", [turned, shape])
    return graph


@dataclass(frozen=True, kw_only=True)
class CodebookWeights(Technique):
    kind = "codebook_weights"
    summary = "VQ4DiT's vector-quantized weights: indices into a k-means codebook per layer, decoded at load"
    excludes = ("gptq", "weight_clip", "group_weights", "mixed_precision", "lowrank", "online_rotation",
                "dynamic_activations", "precompute_kv")  # fmt: skip
    rewrites: ClassVar[Mapping[str, GraphPass]] = {"codebook": emit_codebooks}

    dim: int = 2  # weights per codebook vector (along the input channels)

    def check(self, shape: Shape) -> None:
        super().check(shape)
        if self.dim < 1 or shape.w_bits * self.dim > 8:
            raise QexportError(
                f"codebook_weights stores one uint8 index per vector of {self.dim} weights, so bits.weights x dim "
                f"must be 1..8 (k = 2^(bits x dim) codewords); got bits.weights {shape.w_bits}, dim {self.dim}"
            )

    @classmethod
    def check_widths(cls, config: QuantConfig, widths: Mapping[str, int]) -> None:
        chosen = config.techniques.get(cls.kind)
        if chosen is None:
            return
        bad = [(layer, c) for layer, c in widths.items() if c % chosen.dim]
        if bad:
            layer, width = bad[0]
            raise QexportError(f"codebook_weights.dim {chosen.dim} does not divide the input width {width} of "
                               f"{layer}; pick a dim that divides every quantized linear's input width")  # fmt: skip

    @classmethod
    def plan_layer(cls, step: LayerStep) -> None:
        """The layer's weight as k-means codewords: before the other techniques' layer steps, which
        then see the decoded weight (lp.weight())."""
        chosen = step.rng.config.techniques.get(cls.kind)
        if chosen is None:
            return
        k = 2 ** (step.rng.config.w_bits * chosen.dim)
        codebook, assign = kmeans(vectors(step.w, chosen.dim), k)
        lp = step.lp
        lp.codebook = codebook
        lp.w_q = assign.reshape(step.w.shape[0] // chosen.dim, step.w.shape[1]).astype(np.uint8)

    @classmethod
    def record(cls, config: QuantConfig, plans: list[RangePlan]) -> dict[str, Any]:
        chosen = config.techniques.get(cls.kind)
        if chosen is None:
            return {}  # absent: a build's record as before
        return {cls.kind: {"dim": chosen.dim, "codewords": 2 ** (config.w_bits * chosen.dim)}}

    @classmethod
    def describe(cls, quantization: Mapping[str, Any]) -> list[str]:
        vq = quantization.get(cls.kind)
        if not vq:
            return []
        return [f"  codebook   weights as uint8 indices into {vq['codewords']} codewords of {vq['dim']} per layer "
                "(k-means; decoded to float at load)"]  # fmt: skip
