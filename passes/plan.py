"""The numbers of one quantized range, computed once in numpy and used both by the graph passes
and by the torch simulation: smoothing vectors, final (smoothed, folded) weights and their
per-channel quantization, and per-tensor activation scales from the range's statistics.

Planning is a loop over the registered techniques (passes.techniques.ORDER): per input-sharing
group their fold steps, the range from the statistics, then their group steps; per linear the
weight quantization (GPTQ where a step left a Hessian), then their layer steps."""

from __future__ import annotations

import os
from collections.abc import Collection, Iterator, Mapping
from concurrent.futures import FIRST_COMPLETED, Future, wait
from contextlib import contextmanager
from dataclasses import replace

import numpy as np
from qexport.calib.stats import LayerStats
from qexport.passes.analyze import Group
from qexport.passes.fp_weights import FPWeights
from qexport.passes.gptq import Gram, Hessian, Memo, Rounded
from qexport.passes.pool import planning_pool
from qexport.passes.quant import Grid, qparams, quantize, rows
from qexport.passes.rangeplan import (
    MIXED_HIGH_BITS,
    FinalWeights,
    GroupStep,
    LayerPlan,
    LayerStep,
    QuantConfig,
    RangePlan,
    RangeStep,
    Smooth,
)
from qexport.passes.smoothing import act_stat, smoothing_steps
from qexport.passes.techniques import ORDER
from qexport.passes.weights import gptq_weights, weight_qparams
from qexport.targets.profile import TargetProfile

__all__ = ["MIXED_HIGH_BITS", "LayerPlan", "QuantConfig", "RangePlan", "Smooth", "plan_range"]


def _changed(bias: np.ndarray | None) -> np.ndarray | None:
    return None if bias is None else bias.astype(np.float32)


def _plan_group(rng: RangeStep, g: Group, stats: LayerStats) -> GroupStep:
    """One group through the techniques' fold and group steps."""
    config, steps = rng.config, rng.plan.steps
    act = act_stat(stats, smoothing_steps(steps, stats.steps, config.smooth_ranges), config.smooth, config.asq_stat)
    step = GroupStep(rng=rng, g=g, stats=stats, act=act)
    for technique in ORDER:
        technique.plan_fold(step)
    div = step.divisor
    step.set_range(float((stats.channel_min[steps] / div).min()), float((stats.channel_max[steps] / div).max()))
    step.magnitude = step.act / div  # the group's statistic as its fold step left it
    for technique in ORDER:
        technique.plan_group(step)
    return step


def _grid(rng: RangeStep, bits: int) -> Grid:
    """The weight grid of a linear with these bits (mixed precision raises some)."""
    target = rng.target
    return rng.w_grid if bits == rng.config.w_bits else replace(rng.w_grid, bits=bits, storage=target.weight_type(bits))


def _plan_layer(
    rng: RangeStep, layer: str, step: GroupStep, bits: int, keep_float: bool, rounded: Rounded | None = None
) -> LayerPlan:
    """One linear: its weight quantized (rounded: GPTQ's result where its group has a Hessian), its
    input's quantizer, then the techniques' layer steps."""
    config, target = rng.config, rng.target
    grid = _grid(rng, bits)
    a_scale, a_zero = qparams(np.asarray(step.lo), np.asarray(step.hi), rng.a_grid, target.pow2_scales)

    # the final weight, read only where it is needed (FinalWeights keeps it once made): GPTQ's
    # integers need none here
    def final() -> np.ndarray:
        return rng.final_w[layer]

    if rounded is not None:
        w_scale, w_zero, w_q = rounded
    else:
        w = final()
        w_scale, w_zero = weight_qparams(w, grid, config, target)
        w_q = quantize(w, rows(w_scale, w.shape[0]), rows(w_zero, w.shape[0]), grid)
    folded = step.s is None or step.g.fold == "value"
    lp = LayerPlan(w_q=w_q, w_scale=w_scale, w_zero=w_zero, w_grid=grid, a_scale=a_scale, a_zero=a_zero,
                   a_grid=rng.a_grid, divisor=None if folded else step.s,
                   w_float=final().astype(np.float32) if keep_float else None, rotation=step.online,
                   a_range=step.unshrunk)  # fmt: skip
    assert step.magnitude is not None
    done = LayerStep(rng=rng, layer=layer, made=final, lp=lp, hessian=step.hessian, magnitude=step.magnitude)
    for technique in ORDER:
        technique.plan_layer(done)
    return lp


Waiting = list[tuple[str, GroupStep, int, Hessian]]  # linear, its group's step, its bits, the H it rounds with
PLAN_THREADS = min(8, os.cpu_count() or 1)
"""Threads that quantize linears while the next groups are planned. A linear's plan reads only its
own final weight and its group's step, which no later group changes (it is quantized once no later
group changes its weight), and numpy's array work runs without the GIL: the plans are the same
as planned one after the other. At most PLAN_THREADS linears wait or run beyond the group being
planned, so a range holds the float64 weights of that many more linears, not of the model."""


def _bytes(rng: RangeStep, waiting: Waiting) -> int:
    """Float64 bytes of the waiting linears' weights (made or not yet) and their Hessians."""
    hessians = {id(h): h.nbytes for _, _, _, h in waiting}  # one H per group
    return sum(rng.weights.size(layer) * 8 for layer, _, _, _ in waiting) + sum(hessians.values())


@contextmanager
def _cancelled_on_error(futures: dict[str, Future[LayerPlan]]) -> Iterator[None]:
    """On an error or an interrupt, the linears not yet started are dropped, not quantized first."""
    try:
        yield
    except BaseException:
        for future in futures.values():
            future.cancel()
        raise


def plan_range(
    steps: list[int],
    groups: list[Group],
    stats: dict[str, LayerStats],
    weights: Mapping[str, np.ndarray],
    biases: dict[str, np.ndarray | None],
    config: QuantConfig,
    target: TargetProfile,
    keep_float: bool = False,
    samples: dict[str, np.ndarray] | None = None,
    head_dims: dict[str, int] | None = None,
    group_alpha: dict[str, float] | None = None,
    layer_bits: dict[str, int] | None = None,
    grams: Mapping[str, Gram] | None = None,
    gptq_memo: Memo | None = None,
) -> RangePlan:
    """Plan one range (a list of step indices).

    Args:
        steps: the denoising steps this model serves.
        groups: linears sharing an input, with their fold (from analyze.find_groups).
        stats: calibration statistics per layer.
        weights: FP W^T [in, out] per layer.
        biases: FP bias per layer (None where the linear has none).
        config: bits, smoothing, alpha, and the techniques' settings.
        target: storage types, symmetry, power-of-two scales.
        keep_float: also keep each smoothed FP weight (to check that folding is exact).
        samples: FP inputs [rows, features] of each group's first layer over the range's steps
            (needed by the percentile and MSE observers, and by the rotations for the rotated inputs).
        head_dims: attention-output layer -> its attention's head size (head rotation).
        group_alpha: group tensor -> alpha, overriding config.alpha for that group (alpha "layer").
        layer_bits: layer -> weight bits, overriding config.w_bits for that layer (mixed precision).
        grams: X^T X of each group's first layer's FP input X (GPTQ).
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
    of_layer: dict[str, GroupStep] = {}
    weights = FPWeights.of(weights)
    rng = RangeStep(plan=plan, config=config, target=target, weights=weights,
                    final_w=FinalWeights(weights),
                    final_b={k: (None if v is None else v.astype(np.float64)) for k, v in biases.items()},
                    changed_bias=set(), w_grid=w_grid, a_grid=a_grid, samples=samples, head_dims=dict(head_dims or {}),
                    grams=grams, memo=gptq_memo)  # fmt: skip
    pending = {layer: 1 for g in groups for layer in g.layers}  # the groups that still change each layer
    for g in groups:
        if g.value_layer is not None and g.value_layer in pending:
            pending[g.value_layer] += 1  # a fold or rotation into the value projection
    missing = set(weights) - set(pending)
    if missing:
        raise ValueError(f"layers in no group: {sorted(missing)}")
    planned: dict[str, Future[LayerPlan]] = {}
    waiting: Waiting = []  # linears whose GPTQ is solved with others

    def quantized(layer: str, owner: GroupStep, bits: int, rounded: Rounded | None = None) -> LayerPlan:
        lp = _plan_layer(rng, layer, owner, bits, keep_float, rounded)
        rng.final_w.release(layer)
        return lp

    def settle() -> None:
        """GPTQ for the waiting linears (those of one shape together), then their plans."""
        requests = [(layer, h, _grid(rng, bits)) for layer, _, bits, h in waiting]
        rounded = gptq_weights(requests, rng.final_w, config, target, gptq_memo)  # weights made in its threads
        for layer, owner, bits, _ in waiting:
            planned[layer] = pool.submit(quantized, layer, owner, bits, rounded[layer])
        waiting.clear()

    with planning_pool(PLAN_THREADS, "plan") as pool, _cancelled_on_error(planned):
        for g in groups:
            step = _plan_group(rng, g, stats[g.layers[0]])
            done = [*g.layers, *([g.value_layer] if g.value_layer in pending else [])]
            for layer in done:
                pending[layer] -= 1
            for layer in dict.fromkeys(done):  # quantized as soon as no later group changes its weight
                if pending[layer] == 0 and layer in weights:
                    owner = step if layer in g.layers else of_layer[layer]
                    bits = (layer_bits or {}).get(layer, config.w_bits)
                    if owner.hessian is not None:
                        waiting.append((layer, owner, bits, owner.hessian))
                    else:
                        planned[layer] = pool.submit(quantized, layer, owner, bits)
            # a later group may still fold into these (the value projection): the rest are dropped, with
            # their group's Hessian, samples and divisors, once their linears are quantized
            of_layer.update((layer, step) for layer in g.layers if pending[layer] > 0)
            for layer in done:
                if pending[layer] == 0:
                    of_layer.pop(layer, None)
            if _bytes(rng, waiting) > (0 if gptq_memo is None else gptq_memo.hold):
                settle()
            busy = [f for f in planned.values() if not f.done()]
            while len(busy) > PLAN_THREADS:  # the next group waits for the linears in flight
                busy = list(wait(busy, return_when=FIRST_COMPLETED).not_done)
        settle()
    plan.layers.update((layer, planned[layer].result()) for layer in weights)  # in the weights' order, as before
    for layer, lp in plan.layers.items():
        if layer in rng.changed_bias:
            lp.bias = _changed(rng.final_b[layer])
    return plan


def with_shrink(plan: RangePlan, shrink: float, target: TargetProfile, skip: Collection[str] = ()) -> RangePlan:
    """The plan that planning with act_shrink=shrink gives, from a plan of the same settings and
    another shrink: the shrink moves only the activation quantizers, so the weights (GPTQ's
    among them) and everything else are shared instead of planned again.

    Args:
        plan: a plan_range result.
        shrink: the new ratio of every activation range.
        target: the plan's target (power-of-two scales).
        skip: layers left as they are (those of another plan merged in, exporter.kv).
    """
    layers = {}
    for layer, lp in plan.layers.items():
        if layer in skip:
            layers[layer] = lp
            continue
        if lp.a_range is None:
            raise ValueError(f"{layer}'s plan has no activation range before the shrink")
        lo, hi = lp.a_range
        a_scale, a_zero = qparams(np.asarray(lo * shrink), np.asarray(hi * shrink), lp.a_grid, target.pow2_scales)
        layers[layer] = replace(lp, a_scale=a_scale, a_zero=a_zero)
    return replace(plan, layers=layers, act_shrink=shrink, scores={}, attention={})
