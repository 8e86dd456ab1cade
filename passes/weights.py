"""One linear's weight quantization: scale and zero point per output channel (min-max or the
MSE clip, per tensor where the target asks), and GPTQ rounding: reused across plans by a memo,
solved for several layers at once."""

from __future__ import annotations

import os

import numpy as np
import torch
from qexport.passes.gptq import Hessian, Memo, Problem, Rounded, digest, gptq_quantize_many, output_clipped_qparams
from qexport.passes.pool import planning_pool
from qexport.passes.quant import Grid, group_qparams, mse_clipped_qparams, qparams
from qexport.passes.rangeplan import FinalWeights, QuantConfig
from qexport.targets.profile import TargetProfile

from qexport.stages import stage


def weight_qparams(
    w: np.ndarray | torch.Tensor,
    grid: Grid,
    config: QuantConfig,
    target: TargetProfile,
    hessian: Hessian | None = None,
    device: str = "cpu",
) -> tuple[np.ndarray, np.ndarray]:
    """Scale and zero point per output channel of W^T [in, out]; a per-tensor target gets one value,
    repeated per channel (the whole matrix quantized as one column); with groups ([in / g, out]) per
    group of g input channels and output channel. With GPTQ (a hessian), the MSE
    clip is scored on the layer output after GPTQ rounding (solved on `device`), not on the weight.
    A tensor (a GPU build's weight, made there) gives its min-max ranges from there; the other
    rules read a host copy."""
    if isinstance(w, torch.Tensor):
        if not (config.w_group or config.weight_clip == "mse"):
            cols_t = w if target.weight_per_channel else w.reshape(-1, 1)
            lo, hi = cols_t.amin(dim=0).cpu().numpy(), cols_t.amax(dim=0).cpu().numpy()
            return _per_channel(*qparams(lo, hi, grid, pow2=target.pow2_scales), w.shape[1])
        w = w.cpu().numpy()
    if config.w_group:  # group_weights: min-max per group (the recipe refuses the clip with groups)
        return group_qparams(w, grid, config.w_group, pow2=target.pow2_scales)
    cols = w if target.weight_per_channel else w.reshape(-1, 1)
    if config.weight_clip == "mse" and hessian is not None:
        return output_clipped_qparams(w, hessian, grid, target.pow2_scales, target.weight_per_channel, device)
    if config.weight_clip == "mse":
        scale, zero = mse_clipped_qparams(cols, grid, pow2=target.pow2_scales)
    else:
        scale, zero = qparams(cols.min(axis=0), cols.max(axis=0), grid, pow2=target.pow2_scales)
    return _per_channel(scale, zero, w.shape[1])


def _per_channel(scale: np.ndarray, zero: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Scale and zero point as [n] arrays (one per output channel; a per-tensor value repeated)."""
    return np.broadcast_to(scale, (n,)).copy(), np.broadcast_to(zero, (n,)).copy()


THREADS = min(16, os.cpu_count() or 1)
"""Threads that make, key and scale the linears GPTQ solves together: each holds one made float64
weight at a time (a GPU build's are then parked on the device), so at most this many are in host memory."""

Request = tuple[str, Hessian, Grid]  # layer, H [in, in], its grid (its W^T: the plan's final weight)


def gptq_weights(
    requests: list[Request], final: FinalWeights, config: QuantConfig, target: TargetProfile, memo: Memo | None
) -> dict[str, Rounded]:
    """Scale, zero point and GPTQ integers of each layer's W^T: from the memo where an earlier plan had
    the same inputs, else solved on the memo's device, the layers of one shape and grid together.
    Each weight is made, keyed and given its scale and zero point in a thread; on a GPU it then
    waits for the solve there (FinalWeights.park), not in host memory, as a GPU build's H do."""
    device, park = ("cpu", False) if memo is None else (memo.device, memo.park)
    out: dict[str, Rounded] = {}
    batches: dict[str, tuple[Grid, list[tuple[str, bytes, Problem]]]] = {}
    with stage("GPTQ"):
        rule = (config.weight_clip, repr(config.w_group), repr((target.pow2_scales, target.weight_per_channel)))
        with planning_pool(THREADS, "gptq") as pool:  # making, hashing: numpy, without the GIL
            distinct = {id(h): h for _, h, _ in requests}  # a group's linears share one H: hashed once
            h_keys = dict(zip(distinct, pool.map(lambda h: digest(h).hex(), distinct.values()), strict=True))

            def prepared(request: Request) -> tuple[bytes, Rounded | None, Problem | None]:
                layer, h, grid = request
                # on a GPU the weight is made there (FinalWeights.park), keyed and given its scale there
                w = final.park(layer, device) if park else final[layer]
                key = digest(w, h_keys[id(h)], repr(grid), *rule)
                found = None if memo is None else memo.get(layer, key)
                if found is not None:
                    return key, found, None
                scale, zero = weight_qparams(w, grid, config, target, h, device)
                return key, None, (w, h, scale, zero)

            for (layer, _, grid), (key, found, problem) in zip(requests, pool.map(prepared, requests), strict=True):
                if found is not None:
                    out[layer] = found
                else:
                    assert problem is not None
                    batches.setdefault(repr((problem[0].shape, grid)), (grid, []))[1].append((layer, key, problem))
        for grid, batch in batches.values():
            ints = gptq_quantize_many([problem for _, _, problem in batch], grid, device=device)
            for (layer, key, (_, _, scale, zero)), q in zip(batch, ints, strict=True):
                out[layer] = (scale, zero, q)
                if memo is not None:
                    memo.put(layer, key, out[layer])
    return out
