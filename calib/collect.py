"""Hooks on the model's own sampling loop: reduce each hooked layer's input to statistics as it
flows by, so memory stays O(layers x channels x steps); no activation tensor is kept."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
from qexport.calib.stats import HIST_BINS, MOMENTUM, LayerStats
from torch import nn


class _Accumulator:
    """Running statistics of one layer on the device that runs the model."""

    def __init__(self, steps: int, channels: int, histograms: bool, device: torch.device) -> None:
        self.channels = channels
        self.minimum = torch.full((steps,), math.inf, device=device)
        self.maximum = torch.full((steps,), -math.inf, device=device)
        self.channel_min = torch.full((steps, channels), math.inf, device=device)
        self.channel_max = torch.full((steps, channels), -math.inf, device=device)
        self.absmax_sum = torch.zeros(steps, channels, dtype=torch.float64, device=device)
        self.count = torch.zeros(steps, dtype=torch.int64, device=device)
        self.asq_z = torch.zeros(channels, dtype=torch.float64, device=device)
        self.asq_n = 0
        self.hist = torch.zeros(steps, HIST_BINS, dtype=torch.int64, device=device) if histograms else None
        self.hist_range = [0.0] * steps

    def observe(self, x: torch.Tensor, step: int, samples: int) -> None:
        xs = x.detach().reshape(samples, -1, self.channels).float()
        lo, hi = xs.amin(dim=1), xs.amax(dim=1)  # [samples, C] each (faster than aminmax on CPU)
        self.channel_min[step] = torch.minimum(self.channel_min[step], lo.amin(0))
        self.channel_max[step] = torch.maximum(self.channel_max[step], hi.amax(0))
        self.minimum[step] = torch.minimum(self.minimum[step], self.channel_min[step].amin())
        self.maximum[step] = torch.maximum(self.maximum[step], self.channel_max[step].amax())
        per_sample = torch.maximum(hi, -lo).double()  # max over tokens of |x|: [samples, C]
        self.absmax_sum[step] += per_sample.sum(0)
        self.count[step] += samples
        self.asq_z.mul_(MOMENTUM).add_(per_sample.mean(0), alpha=1 - MOMENTUM)
        self.asq_n += 1
        if self.hist is not None:
            self._histogram(xs, step)

    def _histogram(self, xs: torch.Tensor, step: int) -> None:
        """Bins of width 2R/N over (-R, R), R a power of two above every |x| seen at this step.

        Indices are computed in float64, where x + R and the power-of-two scaling are exact, so
        doubling R later (pairing bins) gives the same counts as binning at the larger R.
        """
        assert self.hist is not None
        peak = float(xs.abs().amax())
        rng = self.hist_range[step] or 2.0 ** math.ceil(math.log2(max(peak, 2**-20)))
        while rng <= peak:
            padded = torch.zeros(2 * HIST_BINS, dtype=torch.int64, device=self.hist.device)
            padded[HIST_BINS // 2 : HIST_BINS // 2 + HIST_BINS] = self.hist[step]
            self.hist[step] = padded.reshape(HIST_BINS, 2).sum(-1)
            rng *= 2
        self.hist_range[step] = rng
        index = ((xs.reshape(-1).double() + rng) * (HIST_BINS / (2 * rng))).floor().long()
        self.hist[step] += torch.bincount(index, minlength=HIST_BINS)

    def result(self) -> LayerStats:
        return LayerStats(
            channels=self.channels,
            minimum=self.minimum.cpu().numpy().astype(np.float32),
            maximum=self.maximum.cpu().numpy().astype(np.float32),
            channel_min=self.channel_min.cpu().numpy().astype(np.float32),
            channel_max=self.channel_max.cpu().numpy().astype(np.float32),
            absmax_sum=self.absmax_sum.cpu().numpy(),
            count=self.count.cpu().numpy(),
            asq_z=self.asq_z.cpu().numpy(),
            asq_n=self.asq_n,
            hist=None if self.hist is None else self.hist.cpu().numpy(),
            hist_range=None if self.hist is None else np.asarray(self.hist_range, dtype=np.float64),
        )


class Collector:
    """Forward pre-hooks on the chosen linears; the sampler tells it the step and batch size."""

    def __init__(self, layers: dict[str, nn.Linear], steps: int, histograms: bool, device: torch.device) -> None:
        self.step = 0
        self.samples = 0
        self.acc = {n: _Accumulator(steps, m.in_features, histograms, device) for n, m in layers.items()}
        self._handles = [m.register_forward_pre_hook(self._hook(n)) for n, m in layers.items()]

    def _hook(self, name: str) -> Any:
        def hook(module: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
            self.acc[name].observe(args[0], self.step, self.samples)

        return hook

    def close(self) -> dict[str, LayerStats]:
        for handle in self._handles:
            handle.remove()
        return {name: acc.result() for name, acc in self.acc.items()}
