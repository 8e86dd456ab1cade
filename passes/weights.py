"""One linear's weight quantization: scale and zero point per output channel (min-max or the
MSE clip, per tensor where the target asks), and GPTQ rounding reused across plans by a memo."""

from __future__ import annotations

import numpy as np
from qexport.passes.gptq import Memo, digest, gptq_quantize, output_clipped_qparams
from qexport.passes.quant import Grid, mse_clipped_qparams, qparams
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
    repeated per channel (the whole matrix quantized as one column). With GPTQ (a hessian), the MSE
    clip is scored on the layer output after GPTQ rounding (solved on `device`), not on the weight."""
    cols = w if target.weight_per_channel else w.reshape(-1, 1)
    if config.weight_clip == "mse" and hessian is not None:
        return output_clipped_qparams(w, hessian, grid, target.pow2_scales, target.weight_per_channel, device)
    if config.weight_clip == "mse":
        scale, zero = mse_clipped_qparams(cols, grid, pow2=target.pow2_scales)
    else:
        scale, zero = qparams(cols.min(axis=0), cols.max(axis=0), grid, pow2=target.pow2_scales)
    shape = (w.shape[1],)
    return np.broadcast_to(scale, shape).copy(), np.broadcast_to(zero, shape).copy()


def gptq_weight(
    layer: str,
    w: np.ndarray,
    hessian: np.ndarray,
    grid: Grid,
    config: QuantConfig,
    target: TargetProfile,
    memo: Memo | None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Scale, zero point and GPTQ integers of W^T, from memo where an earlier plan had the same inputs;
    solved on the memo's device."""
    with stage("GPTQ"):
        key = digest(w, hessian, repr(grid), config.weight_clip, repr((target.pow2_scales, target.weight_per_channel)))
        found = None if memo is None else memo.get(layer, key)
        if found is not None:
            return found
        device = "cpu" if memo is None else memo.device
        scale, zero = weight_qparams(w, grid, config, target, hessian, device)
        result = (scale, zero, gptq_quantize(w, hessian, scale, zero, grid, device=device))
    if memo is not None:
        memo.put(layer, key, result)
    return result
