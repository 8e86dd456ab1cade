"""Twin-log weights (LRQ-DiT): each output channel's weights stored as codes into a table of
non-uniform levels, two logarithmic grids mirrored around zero, instead of a uniform grid.

LRQ-DiT (Yang et al., 2025, arXiv 2508.03485, "Twin-Log Quantization") observes that DiT weights
are Gaussian-like with long tails, so a uniform grid wastes levels on the sparse tails, and
quantizes them to levels of the form ±(2^((q+z)Δ) − η): dense near zero, sparse in the tails. The
project's copy of the paper gives that form, not the split of a channel's codes between the two
signs nor how Δ, z and η are chosen, so those are this module's own, stated here:

- the zero level, then P levels for the positive and N for the negative weights of the channel
  (P + N + 1 = 2^bits; the sign with the larger magnitude gets the extra level);
- each sign's levels are v_j = c · m · (2^(jΔ) − 1) / (2^(nΔ) − 1), j = 0..n: the paper's form with
  η = 2^(zΔ) (so that j = 0 is zero) and 2^(zΔ) = c·m / (2^(nΔ) − 1), where m is the sign's largest
  magnitude, c a clipping ratio and nΔ the octaves the grid spans (nΔ → 0 is the uniform grid);
- c and nΔ are chosen per channel and sign from the grids below, minimising the squared weight
  error with round-to-nearest (no calibration against the model's output).

Emitted as plain ONNX on constants, like the codebook: ``GatherElements(levels [k, out],
Cast(codes [in, out]), axis 0)`` gives W^T [in, out], folded into a float weight at load (codes are
UINT4 for up to 16 levels, else uint8): the saving is in the file, the linear runs as a float MatMul
on the quantized activation (`verify` counts it emulated).
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

OCTAVES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 5.0, 6.0)  # nΔ: the span of a sign's grid (0: uniform)
CLIPS = (1.0, 0.9, 0.8, 0.7)  # c: the largest level as a fraction of the sign's largest magnitude


def _side_levels(top: np.ndarray, n: int, octaves: float) -> np.ndarray:
    """Levels [n + 1, out] of one sign, 0 first: top · (2^(jΔ) − 1) / (2^(nΔ) − 1), nΔ = octaves."""
    j = np.arange(n + 1, dtype=np.float64)[:, None]
    curve = j / n if octaves == 0 else (np.exp2(j * octaves / n) - 1.0) / (np.exp2(octaves) - 1.0)
    return curve * top[None, :]


def _nearest(a: np.ndarray, levels: np.ndarray) -> np.ndarray:
    """The index j of the level nearest each magnitude a [in, out] in each column's increasing levels."""
    n = levels.shape[0] - 1
    j = np.zeros(a.shape, dtype=np.int64)
    for step in (1 << b for b in reversed(range(max(n, 1).bit_length()))):  # binary search per entry
        up = np.minimum(j + step, n)
        j = np.where(np.take_along_axis(levels, up, axis=0) <= a, up, j)
    nxt = np.minimum(j + 1, n)
    lo, hi = np.take_along_axis(levels, j, axis=0), np.take_along_axis(levels, nxt, axis=0)
    return np.where(hi - a < a - lo, nxt, j)


def _fit_side(a: np.ndarray, mask: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """One sign: magnitudes a [in, out] (counted where mask), n levels above zero. The best grid per
    column over OCTAVES x CLIPS: its levels [n + 1, out] and each entry's level index [in, out]."""
    top = np.where(mask, a, 0.0).max(axis=0)
    best_err = np.full(a.shape[1], np.inf)
    best_levels = np.zeros((n + 1, a.shape[1]))
    best_j = np.zeros(a.shape, dtype=np.int64)
    for octaves in OCTAVES:
        for clip in CLIPS:
            levels = _side_levels(top * clip, n, octaves)
            j = _nearest(a, levels)
            err = (np.where(mask, a - np.take_along_axis(levels, j, axis=0), 0.0) ** 2).sum(axis=0)
            better = err < best_err
            best_err = np.where(better, err, best_err)
            best_levels[:, better] = levels[:, better]
            best_j[:, better] = j[:, better]
    return best_levels, best_j


def twin_log(w: np.ndarray, bits: int) -> tuple[np.ndarray, np.ndarray]:
    """W^T [in, out] as per-column levels [2^bits, out] (float32; level 0 is zero, then the positive
    levels, then the negative ones) and codes [in, out] (uint8): W^T ≈ take_along_axis(levels, codes, 0)."""
    if bits < 2:
        raise QexportError(f"twin_log_weights needs bits.weights >= 2 (a level of each sign), got {bits}")
    k = 2**bits
    w = np.asarray(w, dtype=np.float64)
    positive = w > 0
    a = np.abs(w)
    pos_max, neg_max = np.where(positive, a, 0.0).max(axis=0), np.where(w < 0, a, 0.0).max(axis=0)
    n_pos = np.where(pos_max >= neg_max, k // 2, k // 2 - 1)  # per column; the rest go to the negatives
    levels = np.zeros((k, w.shape[1]))
    codes = np.zeros(w.shape, dtype=np.int64)
    for n in sorted(set(n_pos.tolist())):
        cols = n_pos == n
        lv_pos, j_pos = _fit_side(a[:, cols], positive[:, cols], n)
        lv_neg, j_neg = _fit_side(a[:, cols], w[:, cols] < 0, k - 1 - n)
        table = np.concatenate([lv_pos, -lv_neg[1:]])  # [0, +v_1..+v_n, -v_1..-v_(k-1-n)]
        levels[:, cols] = table
        sign = positive[:, cols]
        codes[:, cols] = np.where(sign, j_pos, np.where(j_neg > 0, n + j_neg, 0))
    return levels.astype(np.float32), codes.astype(np.uint8)


def emit_levels(graph: gs.Graph, config: PassConfig, target: TargetProfile) -> gs.Graph:
    """Each twin-log layer's weight: GatherElements(levels, Cast(codes)) along axis 0, W^T [in, out],
    folded into a constant by the runtime at load."""
    for layer, lp in config.plan.layers.items():
        if lp.levels is None:
            continue
        matmul = node_named(graph, config.nodes[layer])
        node = Appender(graph, f"{layer}::")
        index = node("Cast", "codes", [const(f"{layer}::w_q", lp.w_q)], np.int64, to=onnx.TensorProto.INT64)
        matmul.inputs[1] = node("GatherElements", "w_decoded", [const(f"{layer}::levels", lp.levels), index], axis=0)
    return graph


@dataclass(frozen=True, kw_only=True)
class TwinLogWeights(Technique):
    kind = "twin_log_weights"
    summary = "LRQ-DiT's twin-log weights: per-channel codes into two mirrored logarithmic grids, decoded at load"
    excludes = ("gptq", "weight_clip", "group_weights", "mixed_precision", "lowrank", "online_rotation",
                "dynamic_activations", "precompute_kv", "codebook_weights")  # fmt: skip
    rewrites: ClassVar[Mapping[str, GraphPass]] = {"codebook": emit_levels}

    def check(self, shape: Shape) -> None:
        super().check(shape)
        if not 2 <= shape.w_bits <= 8:
            raise QexportError(f"twin_log_weights stores one uint8 (or uint4) code per weight, so bits.weights must "
                               f"be 2..8; got {shape.w_bits}")  # fmt: skip

    @classmethod
    def plan_layer(cls, step: LayerStep) -> None:
        """The layer's weight as twin-log codes: before the other techniques' layer steps, which then
        see the decoded weight (lp.weight())."""
        if cls.kind not in step.rng.config.techniques:
            return
        step.lp.levels, step.lp.w_q = twin_log(step.w, step.rng.config.w_bits)

    @classmethod
    def record(cls, config: QuantConfig, plans: list[RangePlan]) -> dict[str, Any]:
        if cls.kind not in config.techniques:
            return {}  # absent: a build's record as before
        return {cls.kind: {"levels": 2**config.w_bits}}

    @classmethod
    def describe(cls, quantization: Mapping[str, Any]) -> list[str]:
        tl = quantization.get(cls.kind)
        if not tl:
            return []
        return [f"  twin-log   weights as per-channel codes into {tl['levels']} levels, two mirrored log grids "
                "(decoded to float at load)"]  # fmt: skip
