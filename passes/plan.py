"""The numbers of one quantized range, computed once in numpy and used both by the graph
passes and by the torch simulation: smoothing vectors, final (smoothed, folded) weights and
their per-channel quantization, and per-tensor activation scales from the range's statistics."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from enum import StrEnum

import numpy as np
from qexport.calib.stats import MOMENTUM, LayerStats
from qexport.passes.analyze import Group
from qexport.passes.attention import AttentionPlan
from qexport.passes.gptq import Memo, Rounding, digest, gptq_quantize, input_hessian, output_clipped_qparams
from qexport.passes.lowrank import lowrank_factors
from qexport.passes.observe import Observer, observe
from qexport.passes.quant import Grid, dequantize, mse_clipped_qparams, qparams, quantize
from qexport.passes.rotate import hadamard, head_rotation
from qexport.passes.shift import can_shift, channel_shift, shift_fold, shifted_range
from qexport.targets.profile import TargetProfile

from qexport.errors import QexportError

MIXED_HIGH_BITS = 8  # --mixed-precision: the width of the layers it raises


class Smooth(StrEnum):
    NONE = "none"
    ASQ = "asq"  # one s from the aggregated running average, all steps
    TSQ = "tsq"  # one s per time range


@dataclass(frozen=True, kw_only=True)
class QuantConfig:
    """The planning settings of a build, derived from its recipe (qexport.recipe), which checks them."""

    w_bits: int = 8
    a_bits: int = 8
    smooth: Smooth = Smooth.NONE
    alpha: float = 0.5
    alpha_auto: bool = False  # search alpha (the build does it; alpha is then a start value)
    alpha_layer: bool = False  # alpha per input-sharing group, by layer-output error (exporter.alpha)
    asq_stat: str = "ema"  # ASQ's per-channel activation statistic: the running average, or the max over steps
    weight_clip: str = "minmax"  # or "mse": per-channel clip ratio searched for least squared error
    act_observer: Observer = Observer.MINMAX  # per-tensor activation range rule (see passes.observe)
    act_shrink: float = 1.0  # every activation range is scaled by this (the search observer picks it)
    lowrank: int = 0  # rank of the FP error-compensation branch per linear (0 = none; see passes.lowrank)
    rotate: bool = False  # per-head Hadamard folded into value projection / attention output (passes.rotate)
    online_rotation: int = 0  # block size of an online block-diagonal Hadamard before other groups (0 = off)
    rotation_choice: str = "adaptive"  # online rotation: "adaptive" (outliers and lower error) or "all"
    quantize_attention: bool = False  # Q/DQ on both operands of QK^T and PV (passes.attention)
    mixed_precision: float = 0.0  # budget in weight bits per parameter: layers at w_bits or 8 (0 = off)
    weight_rounding: Rounding = Rounding.NEAREST  # or GPTQ: error-compensating rounding (passes.gptq)
    replay_prompts: int | None = None  # calibration prompts the replaying options replay (None: up to 2)
    channel_shift: bool = False  # centre each input channel before the quantizer (passes.shift)
    smooth_ranges: int = 0  # TSQ: one s per this many contiguous step ranges, not per model (0 = per model)


@dataclass(kw_only=True)
class LayerPlan:
    """One linear, as built: final weight (W^T [in, out]) in integers, and how its input is treated."""

    w_q: np.ndarray
    w_scale: np.ndarray  # [out]
    w_zero: np.ndarray  # [out]
    w_grid: Grid
    a_scale: np.ndarray  # scalar
    a_zero: np.ndarray  # scalar
    a_grid: Grid
    divisor: np.ndarray | None  # the simulation divides the input by this (explicit or modulation fold)
    bias: np.ndarray | None = None  # a changed bias (value projection folded by the next linear)
    w_float: np.ndarray | None = None  # the smoothed FP weight before quantization (keep_float only)
    lowrank_a: np.ndarray | None = None  # [in, r] FP32: output += (x_dq · A) · B (--lowrank)
    lowrank_b: np.ndarray | None = None  # [r, out] FP32
    rotation: np.ndarray | None = None  # online Hadamard R [in, in]: the input is x·R before quantizing
    shift: np.ndarray | None = None  # [in]: subtracted from the (smoothed) input before quantizing

    def weight(self) -> np.ndarray:
        return dequantize(self.w_q, self.w_scale[None, :], self.w_zero[None, :])


@dataclass(kw_only=True)
class RangePlan:
    steps: list[int]
    layers: dict[str, LayerPlan] = field(default_factory=dict)
    alpha: float = 0.5
    act_shrink: float = 1.0
    scores: dict[str, dict[float, float]] = field(default_factory=dict)  # search -> candidate -> SQNR dB
    group_alpha: dict[str, float] = field(default_factory=dict)  # group tensor -> alpha (--alpha layer)
    smooth: dict[str, np.ndarray] = field(default_factory=dict)  # group tensor -> s
    folds: dict[str, int] = field(default_factory=dict)  # fold kind -> groups
    rotations: dict[str, np.ndarray] = field(default_factory=dict)  # group tensor -> R folded around it
    online: dict[str, np.ndarray] = field(default_factory=dict)  # group tensor -> R applied online
    online_report: dict[str, dict[str, float]] = field(default_factory=dict)  # group tensor -> criterion, errors
    attention: dict[str, AttentionPlan] = field(default_factory=dict)  # attention module -> operand quantizers
    shifts: dict[str, np.ndarray] = field(default_factory=dict)  # group tensor -> z (--channel-shift)
    shift_folds: dict[str, int] = field(default_factory=dict)  # where z goes (passes.shift) -> groups


def smoothing_vector(act: np.ndarray, wmax: np.ndarray, alpha: float) -> np.ndarray:
    """s_j = a_j^alpha / max_i|W_ij|^(1-alpha), clipped to [1e-4, 1e4]; 1 where a channel is silent."""
    act = np.asarray(act, dtype=np.float64)
    s = np.power(np.maximum(act, 1e-8), alpha) / np.power(np.maximum(wmax, 1e-8), 1.0 - alpha)
    s = np.where(act > 0, s, 1.0)
    return np.clip(s, 1e-4, 1e4)


def _changed(bias: np.ndarray | None) -> np.ndarray | None:
    return None if bias is None else bias.astype(np.float32)


def running_average(per_step: np.ndarray) -> np.ndarray:
    """[C]: the bias-corrected running average (momentum 0.95, ASQ's) of per-step rows [S, C], in
    step order; rows without samples (not finite) are skipped."""
    z, n = np.zeros(per_step.shape[1]), 0
    for row in per_step:
        if np.all(np.isfinite(row)):
            z, n = MOMENTUM * z + (1.0 - MOMENTUM) * row, n + 1
    return z / (1.0 - MOMENTUM**n) if n else z


def smoothing_steps(steps: list[int], total: int, ranges: int) -> list[int]:
    """The steps whose statistics give a range's s: its own, or with --smooth-ranges K the whole
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


def _act_stat(stats: LayerStats, steps: list[int], smooth: Smooth, asq_stat: str = "ema") -> np.ndarray:
    """The per-channel activation magnitude a_j that s is computed from: for ASQ one vector for all
    steps (the running average of the per-batch means of max|x|, the largest per-step mean, or the
    running average of the per-step half-widths), for TSQ / none the mean over the given steps'
    samples (the range's, or its --smooth-ranges range's)."""
    if smooth == Smooth.ASQ:
        if asq_stat == "range":  # what is left to quantize after --channel-shift: the half-widths
            return running_average((stats.channel_max - stats.channel_min).astype(np.float64) / 2.0)
        return stats.asq if asq_stat == "ema" else stats.absmax_mean.max(axis=0)
    return stats.absmax_sum[steps].sum(0) / max(int(stats.count[steps].sum()), 1)


def _gptq_weight(
    layer: str,
    w: np.ndarray,
    hessian: np.ndarray,
    grid: Grid,
    config: QuantConfig,
    target: TargetProfile,
    memo: Memo | None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Scale, zero point and GPTQ integers of W^T, from memo where an earlier plan had the same inputs."""
    key = digest(w, hessian, repr(grid), config.weight_clip, repr((target.pow2_scales, target.weight_per_channel)))
    found = None if memo is None else memo.get(layer, key)
    if found is not None:
        return found
    scale, zero = _weight_qparams(w, grid, config, target, hessian)
    result = (scale, zero, gptq_quantize(w, hessian, scale, zero, grid))
    if memo is not None:
        memo.put(layer, key, result)
    return result


def _weight_qparams(
    w: np.ndarray, grid: Grid, config: QuantConfig, target: TargetProfile, hessian: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Scale and zero point per output channel of W^T [in, out]; a per-tensor target gets one value,
    repeated per channel (the whole matrix quantized as one column). With GPTQ (a hessian), the MSE
    clip is scored on the layer output after GPTQ rounding, not on the weight."""
    cols = w if target.weight_per_channel else w.reshape(-1, 1)
    if config.weight_clip == "mse" and hessian is not None:
        return output_clipped_qparams(w, hessian, grid, target.pow2_scales, target.weight_per_channel)
    if config.weight_clip == "mse":
        scale, zero = mse_clipped_qparams(cols, grid, pow2=target.pow2_scales)
    else:
        scale, zero = qparams(cols.min(axis=0), cols.max(axis=0), grid, pow2=target.pow2_scales)
    shape = (w.shape[1],)
    return np.broadcast_to(scale, shape).copy(), np.broadcast_to(zero, shape).copy()


def plan_range(
    steps: list[int],
    groups: list[Group],
    stats: dict[str, LayerStats],
    weights: dict[str, np.ndarray],
    biases: dict[str, np.ndarray | None],
    config: QuantConfig,
    target: TargetProfile,
    keep_float: bool = False,
    samples: dict[str, np.ndarray] | None = None,
    head_dims: dict[str, int] | None = None,
    group_alpha: dict[str, float] | None = None,
    layer_bits: dict[str, int] | None = None,
    grams: dict[str, np.ndarray] | None = None,
    gptq_memo: Memo | None = None,
) -> RangePlan:
    """Plan one range (a list of step indices).

    Args:
        steps: the denoising steps this model serves.
        groups: linears sharing an input, with their fold (from analyze.find_groups).
        stats: calibration statistics per layer.
        weights: FP W^T [in, out] per layer.
        biases: FP bias per layer (None where the linear has none).
        config: bits, smoothing, alpha.
        target: storage types, symmetry, power-of-two scales.
        keep_float: also keep each smoothed FP weight (to check that folding is exact).
        samples: FP inputs [rows, features] of each group's first layer over the range's steps
            (needed by the percentile and MSE observers, and by --rotate for the rotated inputs).
        head_dims: attention-output layer -> its attention's head size (--rotate).
        group_alpha: group tensor -> alpha, overriding config.alpha for that group (--alpha layer).
        layer_bits: layer -> weight bits, overriding config.w_bits for that layer (--mixed-precision).
        grams: X^T X of each group's first layer's FP input X (--weight-rounding gptq).
        gptq_memo: GPTQ results of earlier plans of the same build, reused where the weight and H
            are the same (gptq.Memo).
    """
    w_grid = Grid(bits=config.w_bits, storage=target.weight_type(config.w_bits), symmetric=target.weight_symmetric)
    a_grid = Grid(
        bits=config.a_bits,
        storage=target.activation_type(config.a_bits),
        symmetric=target.activation_symmetric,
        narrow=False,  # QuantizeLinear saturates activations to the full storage range
    )
    plan = RangePlan(steps=list(steps), alpha=config.alpha, act_shrink=config.act_shrink)
    plan.group_alpha = dict(group_alpha or {})
    final_w = {k: v.astype(np.float64) for k, v in weights.items()}
    final_b = {k: (None if v is None else v.astype(np.float64)) for k, v in biases.items()}
    changed_bias: set[str] = set()
    divisors: dict[str, np.ndarray | None] = {}
    magnitudes: dict[str, np.ndarray] = {}  # per input channel |X/s| (weights the low-rank SVD)
    ranges: dict[str, tuple[float, float]] = {}
    online_of: dict[str, np.ndarray | None] = {}
    hessians: dict[str, np.ndarray] = {}  # per layer, H of the input it quantizes (gptq)
    shifted: dict[str, np.ndarray] = {}  # per layer, the z subtracted from its input (--channel-shift)
    in_value: set[str] = set()  # shifted layers whose z is in the value projection's bias, not at the input
    for g in groups:
        first = stats[g.layers[0]]
        act = _act_stat(first, smoothing_steps(steps, first.steps, config.smooth_ranges), config.smooth,
                        config.asq_stat)  # fmt: skip
        s = None
        if config.smooth != Smooth.NONE:
            wmax = np.max([np.abs(weights[layer]).max(axis=1) for layer in g.layers], axis=0)
            s = smoothing_vector(act, wmax, plan.group_alpha.get(g.tensor, config.alpha))
            plan.smooth[g.tensor] = s
            plan.folds[g.fold] = plan.folds.get(g.fold, 0) + 1
            for layer in g.layers:
                final_w[layer] = final_w[layer] * s[:, None]
            if g.fold == "value" and g.value_layer is not None:
                final_w[g.value_layer] = final_w[g.value_layer] / s[None, :]
                if final_b[g.value_layer] is not None:
                    final_b[g.value_layer] = final_b[g.value_layer] / s
                    changed_bias.add(g.value_layer)
        div = 1.0 if s is None else s
        lo = float((first.channel_min[steps] / div).min())
        hi = float((first.channel_max[steps] / div).max())
        magnitude = act / div
        z = None
        if config.channel_shift and can_shift(g, final_b):
            z = channel_shift(first, steps, div)
            lo, hi = shifted_range(first, steps, div, z)
            plan.shifts[g.tensor] = z
            kind = shift_fold(g)
            plan.shift_folds[kind] = plan.shift_folds.get(kind, 0) + 1
            shifted.update(dict.fromkeys(g.layers, z))
            if kind == "value" and g.value_layer is not None:  # attn·(V - z) = attn·V - z
                final_b[g.value_layer] = final_b[g.value_layer] - z
                changed_bias.add(g.value_layer)
                in_value.update(g.layers)
        rot = None
        if config.rotate and g.fold == "value" and g.value_layer is not None:
            rot = _fold_rotation(g, head_dims or {}, final_w, final_b, changed_bias)
            plan.rotations[g.tensor] = rot
        values = None
        wants_online = bool(config.online_rotation) and rot is None and g.fold != "value"
        if config.act_observer.samples or rot is not None or wants_online:
            if samples is None or g.layers[0] not in samples:
                raise QexportError(f"the {config.act_observer} observer or a rotation has no samples of {g.layers[0]}")
            values = samples[g.layers[0]] / div if z is None else samples[g.layers[0]] / div - z
        if rot is not None and values is not None:
            lo, hi, magnitude, values = _rotated_range(values, rot, lo, hi)
        online = None
        if wants_online and values is not None:
            ws = [final_w[layer] for layer in g.layers]
            online, plan.online_report[g.tensor] = choose_online(values, magnitude, ws, (lo, hi), w_grid, a_grid,
                                                                 config, target)  # fmt: skip
            if online is not None:
                plan.online[g.tensor] = online
                for layer in g.layers:
                    final_w[layer] = online.T @ final_w[layer]
                lo, hi, magnitude, values = _rotated_range(values, online, lo, hi)
        if config.act_observer.samples:
            lo, hi = observe(values, lo, hi, a_grid, config.act_observer, target.pow2_scales)
        lo, hi = lo * config.act_shrink, hi * config.act_shrink
        if config.weight_rounding == Rounding.GPTQ:
            if grams is None or g.layers[0] not in grams:
                raise QexportError(f"--weight-rounding gptq has no input Gram matrix of {g.layers[0]}")
            hessian = input_hessian(grams[g.layers[0]], div, rot if rot is not None else online)
            hessians.update(dict.fromkeys(g.layers, hessian))
        for layer in g.layers:
            online_of[layer] = online
            divisors[layer] = None if (s is None or g.fold == "value") else s
            magnitudes[layer] = magnitude
            ranges[layer] = (lo, hi)
    for layer, w in final_w.items():
        bits = (layer_bits or {}).get(layer, config.w_bits)
        grid = w_grid if bits == config.w_bits else replace(w_grid, bits=bits, storage=target.weight_type(bits))
        a_scale, a_zero = qparams(
            np.asarray(ranges[layer][0]), np.asarray(ranges[layer][1]), a_grid, target.pow2_scales
        )
        if layer in hessians:
            w_scale, w_zero, w_q = _gptq_weight(layer, w, hessians[layer], grid, config, target, gptq_memo)
        else:
            w_scale, w_zero = _weight_qparams(w, grid, config, target)
            w_q = quantize(w, w_scale[None, :], w_zero[None, :], grid)
        if layer in shifted:  # (x - z)·Ŵ + (b + z·Ŵ) = x·Ŵ + b
            final_b[layer] = final_b[layer] + shifted[layer] @ dequantize(w_q, w_scale[None, :], w_zero[None, :])
            changed_bias.add(layer)
        lr_a = lr_b = None
        if config.lowrank:
            w_dq = dequantize(w_q, w_scale[None, :], w_zero[None, :])
            lr_a, lr_b = lowrank_factors(w, w_dq, magnitudes[layer], config.lowrank, hessians.get(layer))
        plan.layers[layer] = LayerPlan(
            w_q=w_q,
            w_scale=w_scale,
            w_zero=w_zero,
            w_grid=grid,
            a_scale=a_scale,
            a_zero=a_zero,
            a_grid=a_grid,
            divisor=divisors[layer],
            bias=_changed(final_b[layer]) if layer in changed_bias else None,
            w_float=w.astype(np.float32) if keep_float else None,
            lowrank_a=lr_a,
            lowrank_b=lr_b,
            rotation=online_of.get(layer),
            shift=shifted[layer].astype(np.float32) if layer in shifted and layer not in in_value else None,
        )
    return plan


OUTLIER_RATIO = 3.0  # adaptive online rotation: max / median of the per-channel input magnitude
ERROR_ROWS = 8192  # sample rows used to compare a group's output error with and without rotation


def _output_error(
    x: np.ndarray, lo: float, hi: float, ws: list[np.ndarray], w_grid: Grid, a_grid: Grid, config: QuantConfig,
    target: TargetProfile,
) -> float:  # fmt: skip
    """Relative squared error of the group's outputs, min-max activation and weight quantization."""
    a_scale, a_zero = qparams(np.asarray(lo), np.asarray(hi), a_grid, target.pow2_scales)
    xq = dequantize(quantize(x, a_scale, a_zero, a_grid), a_scale, a_zero)
    pairs = []
    for w in ws:
        w_scale, w_zero = _weight_qparams(w, w_grid, config, target)
        pairs.append(
            (w, dequantize(quantize(w, w_scale[None, :], w_zero[None, :], w_grid), w_scale[None, :], w_zero[None, :]))
        )
    return relative_error(x, xq, pairs)


def relative_error(x: np.ndarray, xq: np.ndarray, pairs: list[tuple[np.ndarray, np.ndarray]]) -> float:
    """Σ‖xq·wq − x·w‖² / Σ‖x·w‖² over a group's (FP weight, dequantized weight) pairs: the relative
    output error of linears that read one input, x in FP and xq as quantized."""
    err = ref = 0.0
    for w, wq in pairs:
        y = x @ w
        err += float(np.square(xq @ wq - y).sum())
        ref += float(np.square(y).sum())
    return err / max(ref, 1e-30)


def choose_online(
    values: np.ndarray,
    magnitude: np.ndarray,
    ws: list[np.ndarray],
    bounds: tuple[float, float],
    w_grid: Grid,
    a_grid: Grid,
    config: QuantConfig,
    target: TargetProfile,
) -> tuple[np.ndarray | None, dict[str, float]]:
    """The online rotation of one group's (smoothed) input, or None, and why.

    Adaptive: rotate only where the input has outlier channels (max / median of the per-channel
    magnitude >= OUTLIER_RATIO) and where rotation lowers the group's output error on the samples.
    """
    block, channels = config.online_rotation, values.shape[1]
    ratio = float(np.max(magnitude) / max(float(np.median(magnitude)), 1e-12))
    report = {"outlier_ratio": round(ratio, 3)}
    if channels % block:
        return None, {**report, "skipped_block": float(block)}
    if config.rotation_choice == "adaptive" and ratio < OUTLIER_RATIO:
        return None, report
    rot = np.kron(np.eye(channels // block), hadamard(block))
    x = values[:: -(-len(values) // ERROR_ROWS)]
    plain = _output_error(x, *bounds, ws, w_grid, a_grid, config, target)
    rlo, rhi, _, xr = _rotated_range(x, rot, *bounds)
    rotated = _output_error(xr, rlo, rhi, [rot.T @ w for w in ws], w_grid, a_grid, config, target)
    report.update(error_plain=plain, error_rotated=rotated)
    if config.rotation_choice == "adaptive" and rotated >= plain:
        return None, report
    return rot, report


def _fold_rotation(
    g: Group,
    head_dims: dict[str, int],
    final_w: dict[str, np.ndarray],
    final_b: dict[str, np.ndarray | None],
    changed_bias: set[str],
) -> np.ndarray:
    """Fold a per-head Hadamard R around an attention-output group: W_v <- W_v·R, b_v <- b_v·R,
    W_out <- R^T·W_out (W^T [in, out] layout); returns R."""
    assert g.value_layer is not None
    if g.layers[0] not in head_dims:
        raise QexportError(f"--rotate needs the head size of {g.layers[0]}'s attention")
    rot = head_rotation(g.channels, head_dims[g.layers[0]])
    for layer in g.layers:
        final_w[layer] = rot.T @ final_w[layer]
    final_w[g.value_layer] = final_w[g.value_layer] @ rot
    bias = final_b[g.value_layer]
    if bias is not None:
        final_b[g.value_layer] = bias @ rot
        changed_bias.add(g.value_layer)
    return rot


def _rotated_range(
    values: np.ndarray, rot: np.ndarray, lo: float, hi: float
) -> tuple[float, float, np.ndarray, np.ndarray]:
    """Range, per-channel magnitude and samples of X·R, from replayed samples X of the unrotated
    input: the samples' rotated extremes, widened by how much wider the statistics' range of X is
    than the samples' (the replay sees fewer prompts than the calibration)."""
    rotated = values @ rot
    widen = max(1.0, max(hi, -lo) / max(float(np.abs(values).max()), 1e-12))
    return widen * float(rotated.min()), widen * float(rotated.max()), np.abs(rotated).max(axis=0), rotated
