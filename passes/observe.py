"""Activation range observers: the per-tensor [lo, hi] an activation quantizer uses.

- ``minmax``: the exact extremes of the range's calibration statistics (never clips);
- ``percentile``: the 0.01 % / 99.99 % quantiles of replayed calibration samples;
- ``search``: min-max, shrunk by one ratio per range that the build picks by the denoiser's output
  SQNR on the replayed calibration prompts (exporter.search; the plan applies the ratio);
- ``mse``: the clipped range that minimises the squared quantization error (rounding plus
  clipping) of the replayed samples: each end of the min-max range is shrunk by a ratio from
  SHRINK, the two ends in turn (coordinate descent, ROUNDS times).

The samples come from the build (layer inputs of the FP trajectories of calibration prompts);
this module sees numpy arrays only. Both searches work on a histogram of the samples over the
exact min-max range, so their cost does not grow with the sample count.
"""

from __future__ import annotations

from enum import StrEnum

import numpy as np
from qexport.passes.quant import Grid, dequantize, qparams, quantize

BINS = 16384
PERCENTILE = 99.99
SHRINK = 0.93 ** np.arange(42)  # ratios of lo and of hi tried by the MSE search: 1 down to 0.05
ROUNDS = 2


class Observer(StrEnum):
    MINMAX = "minmax"
    PERCENTILE = "percentile"
    MSE = "mse"
    SEARCH = "search"

    @property
    def samples(self) -> bool:
        """Whether the rule reads samples of the activation (replayed calibration prompts)."""
        return self in (Observer.PERCENTILE, Observer.MSE)


def histogram(values: np.ndarray, lo: float, hi: float) -> tuple[np.ndarray, np.ndarray]:
    """Bin centres and counts of values over [lo, hi] (values outside are put in the end bins)."""
    lo, hi = min(lo, 0.0), max(hi, 0.0)
    if hi - lo <= 0:
        return np.zeros(1), np.array([values.size], dtype=np.float64)
    edges = np.linspace(lo, hi, BINS + 1)
    counts, _ = np.histogram(np.clip(values, lo, hi), bins=edges)
    return 0.5 * (edges[:-1] + edges[1:]), counts.astype(np.float64)


def percentile_range(values: np.ndarray, lo: float, hi: float) -> tuple[float, float]:
    """The PERCENTILE quantiles at both ends (never wider than [lo, hi])."""
    q_lo, q_hi = np.percentile(values, [100.0 - PERCENTILE, PERCENTILE])
    return max(float(q_lo), lo), min(float(q_hi), hi)


def range_error(centres: np.ndarray, counts: np.ndarray, lo: float, hi: float, grid: Grid, pow2: bool) -> float:
    """Squared error of quantizing the histogram's samples with the range [lo, hi]."""
    scale, zero = qparams(np.asarray(lo), np.asarray(hi), grid, pow2)
    err = dequantize(quantize(centres, scale, zero, grid), scale, zero) - centres
    return float((counts * err.astype(np.float64) ** 2).sum())


def mse_range(values: np.ndarray, lo: float, hi: float, grid: Grid, pow2: bool = False) -> tuple[float, float]:
    """The [r_lo·lo, r_hi·hi] with the least squared error (one shared ratio on a symmetric grid)."""
    centres, counts = histogram(values, lo, hi)

    def err(r_lo: float, r_hi: float) -> float:
        return range_error(centres, counts, r_lo * lo, r_hi * hi, grid, pow2)

    if grid.symmetric:
        r = min(SHRINK, key=lambda r: err(r, r))
        return float(r * lo), float(r * hi)
    r_lo = r_hi = 1.0
    for _ in range(ROUNDS):
        r_hi = min(SHRINK, key=lambda r: err(r_lo, r))
        r_lo = min(SHRINK, key=lambda r: err(r, r_hi))
    return float(r_lo * lo), float(r_hi * hi)


def observe(
    values: np.ndarray | None, lo: float, hi: float, grid: Grid, observer: Observer, pow2: bool = False
) -> tuple[float, float]:
    """The range an observer picks for one activation tensor.

    Args:
        values: samples of the tensor as it is quantized (smoothing applied); None for minmax.
        lo, hi: the exact extremes from the statistics.
        grid: the activation grid (bits, storage, symmetry).
        observer: which rule.
        pow2: the target rounds scales up to powers of two (the MSE search scores that).
    """
    if not observer.samples:
        return lo, hi
    if values is None or values.size == 0:
        raise ValueError(f"the {observer} observer needs samples of the activation")
    flat = np.asarray(values, dtype=np.float64).reshape(-1)
    if observer == Observer.PERCENTILE:
        return percentile_range(flat, lo, hi)
    return mse_range(flat, lo, hi, grid, pow2)
