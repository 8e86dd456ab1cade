"""Alpha choices made across ranges, before the per-range build (scored on the calibration replay):

- ASQ with ``--alpha auto``: one alpha for all ranges. ASQ's smoothing vector comes from the
  aggregated statistics and is shared by every step, so its alpha is too; a per-range alpha would
  give every step its own weights. Scored end to end: the SQNR of the final latents of the replayed
  sampling loop, each step simulated with its range's plan (the mean per-step SQNR picked an alpha
  that gained 0.9 dB per step and lost 0.5 dB of final PSNR on the evaluation prompts).
- ``--alpha layer``: one alpha per input-sharing group (q/k/v, fc1, ...), the one whose linears'
  outputs are closest to FP (relative squared error of Q(x/s) · Q(s·W) vs (x/s) · (s·W), activation and
  weight quantization together) on the replayed inputs. ASQ: one choice over all steps (weights
  stay shared); TSQ: one per range.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from qexport.exporter.replay import CalibrationReplay
from qexport.exporter.search import ALPHAS, final_score
from qexport.passes.analyze import Group
from qexport.passes.plan import RangePlan
from qexport.passes.quant import dequantize, quantize, relative_error

from qexport.progress import Progress, report

ROWS = 8192  # replayed input rows per group and range used to score --alpha layer

MakePlan = Callable[[list[int], float, dict[str, np.ndarray] | None], RangePlan]


def shared_alpha(
    replay: CalibrationReplay, ranges: list[list[int]], make_plan: MakePlan
) -> tuple[float, dict[float, float]]:
    """One alpha for every range: the best final-latent SQNR of the replayed loop (first wins ties)."""
    range_of = {k: r for r, steps in enumerate(ranges) for k in steps}
    scores = {}
    for a in ALPHAS:
        plans = [make_plan(steps, a, None) for steps in ranges]
        scores[a] = final_score(replay, lambda k: plans[range_of[k]])  # noqa: B023 (called before the next a)
    return max(scores, key=lambda a: (scores[a], -ALPHAS.index(a))), scores


def group_error(plan: RangePlan, group: Group, x: np.ndarray) -> float:
    """Relative squared output error of a group's quantized linears on FP inputs x [rows, in], against
    the same linears smoothed (and folded) in FP: a plan made with keep_float."""
    xs = x / plan.smooth[group.tensor] if group.tensor in plan.smooth else x
    rotation = plan.rotations.get(group.tensor, plan.online.get(group.tensor))  # folded or online: w_float has Rᵀ
    if rotation is not None:
        xs = xs @ rotation
    lp = plan.layers[group.layers[0]]  # the group's linears share one input quantizer
    xq = dequantize(quantize(xs, lp.a_scale, lp.a_zero, lp.a_grid), lp.a_scale, lp.a_zero)
    assert all(plan.layers[layer].w_float is not None for layer in group.layers), "plan with keep_float"
    pairs = [(plan.layers[layer].w_float, plan.layers[layer].weight()) for layer in group.layers]
    return relative_error(xs, xq, pairs)  # type: ignore[arg-type]


def layer_alphas(
    replay: CalibrationReplay,
    ranges: list[list[int]],
    groups: list[Group],
    make_plan: MakePlan,
    shared: bool,
    progress: Progress | None = None,
) -> list[dict[str, float]]:
    """Per range, group tensor -> alpha with the least mean relative output error (see module doc);
    shared: the same choice for every range, by the error averaged over all ranges."""
    errors = np.zeros((len(ranges), len(groups), len(ALPHAS)))
    firsts = [g.layers[0] for g in groups]
    for r, steps in enumerate(ranges):
        inputs = replay.layer_inputs(steps, firsts)
        samples = {name: rows[:: -(-len(rows) // ROWS)] for name, rows in inputs.items()}
        for j, alpha in enumerate(ALPHAS):
            plan = make_plan(steps, alpha, samples)
            for i, g in enumerate(groups):
                errors[r, i, j] = group_error(plan, g, samples[g.layers[0]])
        report(progress, "alpha per layer (ranges)", r + 1, len(ranges))
    if shared:
        errors = np.broadcast_to(errors.mean(axis=0, keepdims=True), errors.shape)
    best = errors.argmin(axis=2)  # first wins ties
    return [{g.tensor: ALPHAS[int(best[r, i])] for i, g in enumerate(groups)} for r in range(len(ranges))]
