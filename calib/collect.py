"""Hooks on the model's own sampling loop: reduce each hooked layer's input to statistics as it
flows by, so memory stays O(layers x channels x steps); no activation tensor is kept.

A hook does one reduction (per-sample, per-channel extremes over the tokens, in the activation's
own dtype), and none where the layer reads the very tensor the previous hooked layer of its width
read (an attention's query, key and value projections of one input): it takes that reduction. The
rest of the update runs once per denoiser call for all layers of the same width together, so the
number of device operations per step does not grow with the number of layers.
"""

from __future__ import annotations

import math
import weakref
from typing import Any

import numpy as np
import torch
from qexport.calib.stats import HIST_BINS, MOMENTUM, LayerStats
from torch import nn


class _Group:
    """Running statistics of the hooked layers with one input width C, stacked [steps, layers, C]."""

    def __init__(self, names: list[str], steps: int, channels: int, device: torch.device) -> None:
        n = len(names)
        self.names, self.channels = names, channels
        self.channel_min = torch.full((steps, n, channels), math.inf, device=device)
        self.channel_max = torch.full((steps, n, channels), -math.inf, device=device)
        self.absmax_sum = torch.zeros(steps, n, channels, dtype=torch.float64, device=device)
        self.asq_z = torch.zeros(n, channels, dtype=torch.float64, device=device)
        self.count = np.zeros((n, steps), dtype=np.int64)  # on the host: no device work per call
        self.asq_n = np.zeros(n, dtype=np.int64)
        self.pending: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # layer -> (lo, hi) [samples, C]
        self.samples = 0  # of the pending reductions (one denoiser call's batch)
        self._index: dict[tuple[int, ...], torch.Tensor] = {}
        self.device = device
        # the tensor the last reduction read (not kept alive), its version, its samples and the result
        self._last: tuple[weakref.ref[torch.Tensor], int, int, tuple[torch.Tensor, torch.Tensor]] | None = None

    def observe(self, i: int, x: torch.Tensor, step: int, samples: int) -> None:
        if i in self.pending:  # a layer called twice in one denoiser call: keep the order of updates
            self.flush(step)
        last = self._last
        if last is not None and last[0]() is x and last[1] == x._version and last[2] == samples:
            self.pending[i] = last[3]  # the same input, unchanged since: the same extremes
        else:
            xs = x.detach().reshape(samples, -1, self.channels)  # in its own dtype: extremes are exact there
            if xs.is_cuda:  # one pass over the activation
                self.pending[i] = torch.aminmax(xs, dim=1)
            else:  # two reductions are faster than aminmax on CPU
                self.pending[i] = (xs.amin(dim=1), xs.amax(dim=1))
            self._last = (weakref.ref(x), x._version, samples, self.pending[i])
        self.samples = samples  # the counts are added at the flush: no host work per layer here

    def flush(self, step: int) -> None:
        """Fold the pending extremes of one denoiser call into the running statistics."""
        if not self.pending:
            return
        seen = list(self.pending)  # each layer at most once (observe flushes before a second call)
        self.count[seen, step] += self.samples
        self.asq_n[seen] += 1
        buckets: dict[torch.dtype, list[int]] = {}  # one stack and one cast per activation dtype
        for i in sorted(self.pending):
            buckets.setdefault(self.pending[i][0].dtype, []).append(i)
        order = tuple(i for rows in buckets.values() for i in rows)
        lo = torch.cat([torch.stack([self.pending[i][0] for i in rows]).float() for rows in buckets.values()])
        hi = torch.cat([torch.stack([self.pending[i][1] for i in rows]).float() for rows in buckets.values()])
        self.pending.clear()  # lo, hi: [k, samples, C] in the layer order of `order`
        per_sample = torch.maximum(hi, -lo).double()  # max over tokens of |x|
        if order == tuple(range(len(self.names))):  # every layer once, in order: plain slices
            cmin, cmax, total = self.channel_min[step], self.channel_max[step], self.absmax_sum[step]
            torch.minimum(cmin, lo.amin(1), out=cmin)
            torch.maximum(cmax, hi.amax(1), out=cmax)
            total += per_sample.sum(1)
            self.asq_z.mul_(MOMENTUM).add_(per_sample.mean(1), alpha=1 - MOMENTUM)
            return
        index = self._index.get(order)
        if index is None:
            index = self._index[order] = torch.tensor(order, device=self.device)
        cmin, cmax = self.channel_min[step], self.channel_max[step]  # rows of index are distinct
        cmin.index_copy_(0, index, torch.minimum(cmin.index_select(0, index), lo.amin(1)))
        cmax.index_copy_(0, index, torch.maximum(cmax.index_select(0, index), hi.amax(1)))
        self.absmax_sum[step].index_add_(0, index, per_sample.sum(1))
        z = self.asq_z.index_select(0, index).mul_(MOMENTUM).add_(per_sample.mean(1), alpha=1 - MOMENTUM)
        self.asq_z.index_copy_(0, index, z)

    def results(self, hists: dict[str, _Histogram]) -> dict[str, LayerStats]:
        channel_min = self.channel_min.cpu().numpy().astype(np.float32)
        channel_max = self.channel_max.cpu().numpy().astype(np.float32)
        absmax_sum, asq_z = self.absmax_sum.cpu().numpy(), self.asq_z.cpu().numpy()
        out = {}
        for i, name in enumerate(self.names):
            hist = hists.get(name)
            lo, hi = channel_min[:, i].copy(), channel_max[:, i].copy()
            out[name] = LayerStats(
                channels=self.channels,
                minimum=lo.min(axis=1),  # the per-tensor extremes are the channels' extremes
                maximum=hi.max(axis=1),
                channel_min=lo,
                channel_max=hi,
                absmax_sum=absmax_sum[:, i].copy(),
                count=self.count[i].copy(),
                asq_z=asq_z[i].copy(),
                asq_n=int(self.asq_n[i]),
                hist=None if hist is None else hist.hist.cpu().numpy(),
                hist_range=None if hist is None else np.asarray(hist.hist_range, dtype=np.float64),
            )
        return out

    def nbytes(self) -> int:
        tensors = (self.channel_min, self.channel_max, self.absmax_sum, self.asq_z)
        return sum(t.element_size() * t.nelement() for t in tensors) + self.count.nbytes + self.asq_n.nbytes


class _Histogram:
    """Symmetric histograms of one layer's input, one per step (see ``observe``)."""

    def __init__(self, steps: int, device: torch.device) -> None:
        self.hist = torch.zeros(steps, HIST_BINS, dtype=torch.int64, device=device)
        self.hist_range = [0.0] * steps

    def observe(self, xs: torch.Tensor, step: int) -> None:
        """Bins of width 2R/N over (-R, R), R a power of two above every |x| seen at this step.

        Indices are computed in float64, where x + R and the power-of-two scaling are exact, so
        doubling R later (pairing bins) gives the same counts as binning at the larger R.
        """
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


class Collector:
    """Forward pre-hooks on the chosen linears; the sampler tells it the step and batch size.

    Setting ``step`` or ``samples`` (before each denoiser call) folds the previous call's pending
    extremes into the statistics; ``close`` folds the last ones.
    """

    def __init__(self, layers: dict[str, nn.Linear], steps: int, histograms: bool, device: torch.device) -> None:
        self._step = 0
        self._samples = 0
        self.order = list(layers)
        widths: dict[int, list[str]] = {}
        for name, module in layers.items():
            widths.setdefault(module.in_features, []).append(name)
        self.groups = [_Group(names, steps, c, device) for c, names in widths.items()]
        self.where = {name: (g, i) for g in self.groups for i, name in enumerate(g.names)}
        self.hists = {name: _Histogram(steps, device) for name in layers} if histograms else {}
        self._handles = [m.register_forward_pre_hook(self._hook(n)) for n, m in layers.items()]

    @property
    def step(self) -> int:
        return self._step

    @step.setter
    def step(self, value: int) -> None:
        self._flush()
        self._step = value

    @property
    def samples(self) -> int:
        return self._samples

    @samples.setter
    def samples(self, value: int) -> None:
        self._flush()
        self._samples = value

    def _flush(self) -> None:
        for group in self.groups:
            group.flush(self._step)

    def _hook(self, name: str) -> Any:
        group, i = self.where[name]
        hist = self.hists.get(name)

        def hook(module: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
            group.observe(i, args[0], self._step, self._samples)
            if hist is not None:
                hist.observe(args[0].detach().reshape(self._samples, -1, group.channels).float(), self._step)

        return hook

    def nbytes(self) -> int:
        """Bytes held by the running statistics (independent of how much data flows by)."""
        return sum(g.nbytes() for g in self.groups) + sum(h.hist.element_size() * h.hist.nelement()
                                                          for h in self.hists.values())  # fmt: skip

    def close(self) -> dict[str, LayerStats]:
        self._flush()
        for handle in self._handles:
            handle.remove()
        out: dict[str, LayerStats] = {}
        for group in self.groups:
            out.update(group.results(self.hists))
        return {name: out[name] for name in self.order}
