"""Low-rank compensation of the weight-quantization error (``build --lowrank R``), numpy only.

Per quantized linear with final weight W (W^T [in, out], smoothed) and quantized Q(W), a pair
A [in, r], B [r, out] so that x·Q(W) + (x·A)·B ≈ x·W for the inputs the layer sees. E = W − Q(W)
is weighted by d, the per-input-channel magnitude of the layer's (smoothed) input X/s, and
diag(d)·E = U Σ Vᵀ; then A = diag(1/d)·U_r·Σ_r = E·V_r and B = V_rᵀ (the second form needs no
division, so silent channels, d_j = 0, are harmless). The graph pass is ``techniques.lowrank.insert_lowrank``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from qexport.passes.gptq import damped

MAX_RANK = 32


def lowrank_factors(
    w: np.ndarray, w_dq: np.ndarray, d: np.ndarray, rank: int, hessian: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """The rank-r correction of one layer's weight-quantization error.

    Args:
        w: the FP weight W^T [in, out] as planned (smoothing folded in).
        w_dq: the dequantized weight Q(W) [in, out].
        d: [in] per-input-channel activation magnitude of the input the layer reads (X/s).
        rank: r >= 1 (capped at min(in, out)).
        hessian: [in, in] H = XᵀX of that input, where the build has it (--weight-rounding gptq):
            the error is then weighted by Lᵀ (H + λI = L·Lᵀ) instead of diag(d), so that A·B
            minimises ||X·(E − A·B)|| on the inputs H came from.

    Returns:
        A [in, r] and B [r, out], float32, minimising ||diag(d)·(E − A·B)||_F (or ||Lᵀ·(E − A·B)||_F).
    """
    err = np.asarray(w, dtype=np.float64) - np.asarray(w_dq, dtype=np.float64)
    if hessian is None:
        weighted = np.asarray(d, dtype=np.float64)[:, None] * err
    else:
        weighted = np.linalg.cholesky(damped(hessian)).T @ err
    _, _, vt = np.linalg.svd(weighted, full_matrices=False)
    r = min(rank, vt.shape[0])
    b = vt[:r]  # [r, out], orthonormal rows
    a = err @ b.T  # = diag(1/d)·U_r·Σ_r where d > 0
    return a.astype(np.float32), b.astype(np.float32)


@dataclass(frozen=True, kw_only=True)
class BranchCost:
    """What the low-rank branches add to one model call, against its quantized linears."""

    macs: int  # multiply-accumulates of the branches (x·A and ·B)
    linear_macs: int  # of the quantized linears themselves
    bytes: int  # FP32 A and B

    def __add__(self, other: BranchCost) -> BranchCost:
        macs, linear = self.macs + other.macs, self.linear_macs + other.linear_macs
        return BranchCost(macs=macs, linear_macs=linear, bytes=self.bytes + other.bytes)


def branch_cost(
    rows: int, a: np.ndarray | None, b: np.ndarray | None, out_features: int, in_features: int
) -> BranchCost:
    """Cost of one layer's branch for `rows` input rows (tokens x batch) per model call."""
    linear = rows * in_features * out_features
    if a is None or b is None:
        return BranchCost(macs=0, linear_macs=linear, bytes=0)
    r = a.shape[1]
    return BranchCost(macs=rows * r * (in_features + out_features), linear_macs=linear, bytes=a.nbytes + b.nbytes)
