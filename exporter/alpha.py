"""``--alpha auto``: per range, the SmoothQuant alpha in 0.1..1.0 whose plan gives the highest
denoiser-output SQNR (torch simulation vs FP) on the FP trajectories of calibration prompts."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from qexport.exporter.replay import CalibrationReplay
from qexport.exporter.simulate import simulated
from qexport.passes.plan import RangePlan

from qexport.metrics import sqnr_db

ALPHAS = tuple(round(float(a), 1) for a in np.arange(0.1, 1.01, 0.1))


def score(replay: CalibrationReplay, plan: RangePlan) -> float:
    """Mean denoiser-output SQNR (dB) of a plan over its range's steps."""
    with simulated(replay.adapter.transformer, plan):
        return float(np.mean([sqnr_db(replay.reference(k), replay.run(k)) for k in plan.steps]))


def best_alpha(
    replay: CalibrationReplay, make_plan: Callable[[float], RangePlan]
) -> tuple[float, RangePlan, dict[float, float]]:
    """The best alpha, its plan, and every candidate's score."""
    scores: dict[float, float] = {}
    best: tuple[float, RangePlan] | None = None
    for alpha in ALPHAS:
        plan = make_plan(alpha)
        scores[alpha] = score(replay, plan)
        if best is None or scores[alpha] > scores[best[0]]:
            best = (alpha, plan)
    assert best is not None
    return best[0], best[1], scores
