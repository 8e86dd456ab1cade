"""SmoothQuant's numbers: the smoothing vector s, ASQ's running average, the per-channel activation
statistic s is computed from, and the steps a range's s is taken over."""

from __future__ import annotations

import numpy as np
from qexport.calib.stats import MOMENTUM, LayerStats
from qexport.passes.rangeplan import Smooth

from qexport.errors import QexportError


def smoothing_vector(act: np.ndarray, wmax: np.ndarray, alpha: float) -> np.ndarray:
    """s_j = a_j^alpha / max_i|W_ij|^(1-alpha), clipped to [1e-4, 1e4]; 1 where a channel is silent."""
    act = np.asarray(act, dtype=np.float64)
    s = np.power(np.maximum(act, 1e-8), alpha) / np.power(np.maximum(wmax, 1e-8), 1.0 - alpha)
    s = np.where(act > 0, s, 1.0)
    return np.clip(s, 1e-4, 1e4)


def running_average(per_step: np.ndarray) -> np.ndarray:
    """[C]: the bias-corrected running average (momentum 0.95, ASQ's) of per-step rows [S, C], in
    step order; rows without samples (not finite) are skipped."""
    z, n = np.zeros(per_step.shape[1]), 0
    for row in per_step:
        if np.all(np.isfinite(row)):
            z, n = MOMENTUM * z + (1.0 - MOMENTUM) * row, n + 1
    return z / (1.0 - MOMENTUM**n) if n else z


def smoothing_steps(steps: list[int], total: int, ranges: int) -> list[int]:
    """The steps whose statistics give a range's s: its own, or with shared ranges K the whole
    one of K contiguous step ranges that holds its first step (models in it then share weights).

    Raises:
        QexportError: K above the calibrated steps.
    """
    if not ranges:
        return steps
    if ranges > total:
        raise QexportError(
            f"recipe key 'smoothquant.shared_ranges' must be in 1..{total} (the calibrated steps), got {ranges}"
        )
    parts = np.array_split(np.arange(total), ranges)
    return next([int(i) for i in part] for part in parts if steps[0] in part)


def ranks(values: np.ndarray) -> np.ndarray:
    """1-based ranks, ties sharing their mean rank (as Spearman's correlation ranks them)."""
    order = np.argsort(values, kind="stable")
    sorted_values = values[order]
    out = np.empty(len(values), dtype=np.float64)
    start = 0
    for end in range(1, len(values) + 1):
        if end == len(values) or sorted_values[end] != sorted_values[start]:
            out[order[start:end]] = (start + end + 1) / 2.0
            start = end
    return out


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman's rank correlation of two vectors (0 where either is constant)."""
    ra, rb = ranks(np.asarray(a, np.float64)), ranks(np.asarray(b, np.float64))
    ra, rb = ra - ra.mean(), rb - rb.mean()
    norm = float(np.sqrt((ra * ra).sum() * (rb * rb).sum()))
    return float((ra * rb).sum()) / norm if norm > 0 else 0.0


def salience_calibrated(stats: LayerStats, steps: list[int], wmax: np.ndarray) -> np.ndarray:
    """PTQ4DiT's Spearman's-rho-guided salience calibration: the per-step activation salience a_t (the
    mean over the step's samples of max over tokens |x|, per channel) aggregated over the steps with
    weights softmax_t(-rho_t), rho_t the Spearman correlation of a_t with the weight salience max_i|W_ij|:
    steps whose activation and weight outliers fall on different channels (low rho: where balancing
    helps most) weigh more. PTQ4DiT weighs calibration samples; here each step's mean stands for its
    samples."""
    rows = [t for t in steps if stats.count[t] > 0]
    per_step = stats.absmax_sum[rows] / stats.count[rows][:, None]
    rho = np.array([spearman(a, wmax) for a in per_step])
    weights = np.exp(-(rho - rho.min()))
    return (weights[:, None] * per_step).sum(axis=0) / weights.sum()


def act_stat(stats: LayerStats, steps: list[int], smooth: Smooth, asq_stat: str = "ema") -> np.ndarray:
    """The per-channel activation magnitude a_j that s is computed from: for ASQ one vector for all
    steps (the running average of the per-batch means of max|x|, the largest per-step mean, or the
    running average of the per-step half-widths), for TSQ / none the mean over the given steps'
    samples (the range's, or its shared range's)."""
    if smooth == Smooth.ASQ:
        if asq_stat == "range":  # what is left to quantize after a channel shift: the half-widths
            return running_average((stats.channel_max - stats.channel_min).astype(np.float64) / 2.0)
        return stats.asq if asq_stat == "ema" else stats.absmax_mean.max(axis=0)
    return stats.absmax_sum[steps].sum(0) / max(int(stats.count[steps].sum()), 1)
