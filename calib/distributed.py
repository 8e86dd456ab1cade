"""Reduce per-rank statistics over torch.distributed (gloo on CPU, NCCL on GPU) so the result
equals one process calibrating all prompts: rank r holds the r-th contiguous block of batches."""

from __future__ import annotations

import numpy as np
import torch
import torch.distributed as dist
from qexport.calib.stats import MOMENTUM, LayerStats, align_range


def _t(a: np.ndarray, device: torch.device) -> torch.Tensor:
    """A copy on device: collectives work in place and must not write into the local stats."""
    return torch.tensor(a, device=device)


def reduce_layers(layers: dict[str, LayerStats], device: torch.device) -> dict[str, LayerStats]:
    """All-reduce every layer's statistics; every rank returns the same merged result."""
    world = dist.get_world_size()
    out = {}
    for name in sorted(layers):
        s = layers[name]
        mn, mx = _t(s.minimum, device), _t(s.maximum, device)
        cmn, cmx = _t(s.channel_min, device), _t(s.channel_max, device)
        dist.all_reduce(cmn, dist.ReduceOp.MIN)
        dist.all_reduce(cmx, dist.ReduceOp.MAX)
        total, count = _t(s.absmax_sum, device), _t(s.count, device)
        dist.all_reduce(mn, dist.ReduceOp.MIN)
        dist.all_reduce(mx, dist.ReduceOp.MAX)
        dist.all_reduce(total)
        dist.all_reduce(count)
        zs = [torch.empty_like(_t(s.asq_z, device)) for _ in range(world)]
        ns = [torch.empty(1, dtype=torch.int64, device=device) for _ in range(world)]
        dist.all_gather(zs, _t(s.asq_z, device))
        dist.all_gather(ns, torch.tensor([s.asq_n], dtype=torch.int64, device=device))
        z, n = torch.zeros_like(zs[0]), 0
        for zr, nr in zip(zs, ns, strict=True):  # in rank order = sampling order
            z = MOMENTUM ** int(nr) * z + zr
            n += int(nr)
        hist = hist_range = None
        if s.hist is not None and s.hist_range is not None:
            rng = _t(s.hist_range, device)
            dist.all_reduce(rng, dist.ReduceOp.MAX)
            hist_range = rng.cpu().numpy()
            local = np.stack([align_range(s.hist[i], s.hist_range[i], hist_range[i]) for i in range(s.steps)])
            h = _t(local, device)
            dist.all_reduce(h)
            hist = h.cpu().numpy()
        out[name] = LayerStats(
            channels=s.channels,
            minimum=mn.cpu().numpy(),
            maximum=mx.cpu().numpy(),
            channel_min=cmn.cpu().numpy(),
            channel_max=cmx.cpu().numpy(),
            absmax_sum=total.cpu().numpy(),
            count=count.cpu().numpy(),
            asq_z=z.cpu().numpy(),
            asq_n=n,
            hist=hist,
            hist_range=hist_range,
        )
    return out
