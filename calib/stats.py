"""Per-layer, per-step activation statistics and their exact merge.

For each layer input and denoising step: per-tensor min/max, the per-channel max |x| summed over
samples (mean = sum / count), sample counts; the ASQ aggregate as a zero-initialised running
average with momentum 0.95 in sampling order (bias-corrected on read, so shards merge exactly);
optional symmetric histograms whose range doubles as needed (exact to merge). Numpy only.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

MOMENTUM = 0.95
HIST_BINS = 2048


@dataclass(kw_only=True)
class LayerStats:
    """Statistics of one layer's input over S steps and C channels."""

    channels: int
    minimum: np.ndarray  # [S] float32
    maximum: np.ndarray  # [S] float32
    channel_min: np.ndarray  # [S, C] float32: per-channel extremes (ranges of X / s after smoothing)
    channel_max: np.ndarray  # [S, C] float32
    absmax_sum: np.ndarray  # [S, C] float64: sum over samples of max over tokens |x|
    count: np.ndarray  # [S] int64 samples
    asq_z: np.ndarray  # [C] float64: zero-initialised EMA of the per-step batch means
    asq_n: int  # EMA updates so far
    hist: np.ndarray | None = None  # [S, HIST_BINS] int64 over [-hist_range, hist_range]
    hist_range: np.ndarray | None = None  # [S] float64, powers of two

    @property
    def steps(self) -> int:
        return len(self.minimum)

    @property
    def absmax_mean(self) -> np.ndarray:
        """[S, C]: per-channel max |x| averaged over all calibration samples of each step."""
        return self.absmax_sum / np.maximum(self.count, 1)[:, None]

    @property
    def asq(self) -> np.ndarray:
        """[C]: the aggregated (ASQ) per-channel estimate, bias-corrected running average."""
        if self.asq_n == 0:
            return np.zeros(self.channels)
        return self.asq_z / (1.0 - MOMENTUM**self.asq_n)


def double_range(hist: np.ndarray) -> np.ndarray:
    """Re-bin a symmetric histogram onto twice its range (exact: bins pair up)."""
    bins = hist.shape[-1]
    padded = np.zeros((*hist.shape[:-1], 2 * bins), dtype=hist.dtype)
    padded[..., bins // 2 : bins // 2 + bins] = hist
    return padded.reshape(*hist.shape[:-1], bins, 2).sum(-1)


def align_range(hist: np.ndarray, rng: float, target: float) -> np.ndarray:
    if rng == 0:  # no samples yet: an empty histogram fits any range
        return hist
    while rng < target:
        hist, rng = double_range(hist), rng * 2
    return hist


def merge(a: LayerStats, b: LayerStats) -> LayerStats:
    """Stats of a's samples followed by b's (order matters only for the running average)."""
    if a.steps != b.steps or a.channels != b.channels:
        raise ValueError(f"cannot merge stats of shape {a.steps}x{a.channels} with {b.steps}x{b.channels}")
    hist = hist_range = None
    if a.hist is not None and b.hist is not None and a.hist_range is not None and b.hist_range is not None:
        hist_range = np.maximum(a.hist_range, b.hist_range)
        hist = np.stack(
            [
                align_range(a.hist[s], a.hist_range[s], hist_range[s])
                + align_range(b.hist[s], b.hist_range[s], hist_range[s])
                for s in range(a.steps)
            ]
        )
    return LayerStats(
        channels=a.channels,
        minimum=np.minimum(a.minimum, b.minimum),
        maximum=np.maximum(a.maximum, b.maximum),
        channel_min=np.minimum(a.channel_min, b.channel_min),
        channel_max=np.maximum(a.channel_max, b.channel_max),
        absmax_sum=a.absmax_sum + b.absmax_sum,
        count=a.count + b.count,
        asq_z=MOMENTUM**b.asq_n * a.asq_z + b.asq_z,
        asq_n=a.asq_n + b.asq_n,
        hist=hist,
        hist_range=hist_range,
    )
