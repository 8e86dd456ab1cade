"""One linear's weight quantization: scale and zero point per output channel (min-max or the
MSE clip, per tensor where the target asks), and GPTQ rounding: reused across plans by a memo,
solved for several layers at once."""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from qexport.passes.gptq import Memo, Problem, Rounded, digest, gptq_quantize_many, output_clipped_qparams
from qexport.passes.quant import Grid, group_qparams, mse_clipped_qparams, qparams
from qexport.passes.rangeplan import QuantConfig
from qexport.targets.profile import TargetProfile

from qexport.stages import stage


def weight_qparams(
    w: np.ndarray,
    grid: Grid,
    config: QuantConfig,
    target: TargetProfile,
    hessian: np.ndarray | None = None,
    device: str = "cpu",
) -> tuple[np.ndarray, np.ndarray]:
    """Scale and zero point per output channel of W^T [in, out]; a per-tensor target gets one value,
    repeated per channel (the whole matrix quantized as one column); with groups ([in / g, out]) per
    group of g input channels and output channel. With GPTQ (a hessian), the MSE
    clip is scored on the layer output after GPTQ rounding (solved on `device`), not on the weight."""
    if config.w_group:  # group_weights: min-max per group (the recipe refuses the clip with groups)
        return group_qparams(w, grid, config.w_group, pow2=target.pow2_scales)
    cols = w if target.weight_per_channel else w.reshape(-1, 1)
    if config.weight_clip == "mse" and hessian is not None:
        return output_clipped_qparams(w, hessian, grid, target.pow2_scales, target.weight_per_channel, device)
    if config.weight_clip == "mse":
        scale, zero = mse_clipped_qparams(cols, grid, pow2=target.pow2_scales)
    else:
        scale, zero = qparams(cols.min(axis=0), cols.max(axis=0), grid, pow2=target.pow2_scales)
    shape = (w.shape[1],)
    return np.broadcast_to(scale, shape).copy(), np.broadcast_to(zero, shape).copy()


Request = tuple[str, np.ndarray, np.ndarray, Grid]  # layer, W^T [in, out], H [in, in], its grid


def gptq_weights(
    requests: list[Request], config: QuantConfig, target: TargetProfile, memo: Memo | None
) -> dict[str, Rounded]:
    """Scale, zero point and GPTQ integers of each layer's W^T: from the memo where an earlier plan had
    the same inputs, else solved on the memo's device, the layers of one shape and grid together."""
    device = "cpu" if memo is None else memo.device
    out: dict[str, Rounded] = {}
    batches: dict[str, tuple[Grid, list[tuple[str, Problem]]]] = {}
    with stage("GPTQ"):
        rule = (config.weight_clip, repr(config.w_group), repr((target.pow2_scales, target.weight_per_channel)))
        with ThreadPoolExecutor(max_workers=os.cpu_count()) as pool:  # hashing runs without the GIL
            digests = pool.map(lambda r: digest(r[1], r[2], repr(r[3]), *rule), requests)
            keys = {layer: key for (layer, *_), key in zip(requests, digests, strict=True)}
        for layer, w, hessian, grid in requests:
            found = None if memo is None else memo.get(layer, keys[layer])
            if found is not None:
                out[layer] = found
                continue
            scale, zero = weight_qparams(w, grid, config, target, hessian, device)
            batches.setdefault(repr((w.shape, grid)), (grid, []))[1].append((layer, (w, hessian, scale, zero)))
        for grid, batch in batches.values():
            ints = gptq_quantize_many([problem for _, problem in batch], grid, device=device)
            for (layer, (_, _, scale, zero)), q in zip(batch, ints, strict=True):
                out[layer] = (scale, zero, q)
                if memo is not None:
                    memo.put(layer, keys[layer], out[layer])
    return out
