"""Searches scored on the replayed calibration prompts: per range, the candidate whose plan gives
the highest denoiser-output SQNR (torch simulation vs FP) over the range's steps.

- ``--alpha auto``: the SmoothQuant alpha in 0.1..1.0;
- ``--act-observer search``: one shrink ratio of every activation min-max range (after alpha).
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import ExitStack

import numpy as np
from qexport.exporter.replay import CalibrationReplay
from qexport.exporter.simulate import simulated
from qexport.passes.plan import RangePlan

from qexport.metrics import sqnr_db

ALPHAS = tuple(round(float(a), 1) for a in np.arange(0.1, 1.01, 0.1))
SHRINKS = (1.0, 0.98, 0.96, 0.94, 0.92, 0.9, 0.87, 0.84, 0.8, 0.75)


def score(replay: CalibrationReplay, plan: RangePlan) -> float:
    """Mean denoiser-output SQNR (dB) of a plan over its range's steps."""
    with simulated(replay.adapter.transformer, plan):
        return float(np.mean([sqnr_db(replay.reference(k), replay.run(k)) for k in plan.steps]))


def final_score(replay: CalibrationReplay, plan_of_step: Callable[[int], RangePlan]) -> float:
    """SQNR (dB) of the final latents of the whole sampling loop on the replay, each step simulated
    with its plan, vs FP from the same noise: what the end-to-end PSNR measures."""
    with ExitStack() as stack:

        def switch(k: int, t: int) -> None:
            stack.close()
            stack.enter_context(simulated(replay.adapter.transformer, plan_of_step(k)))

        final = replay.sample(on_step=switch).numpy()
    return sqnr_db(replay.final, final)


def best(
    replay: CalibrationReplay, candidates: tuple[float, ...], make_plan: Callable[[float], RangePlan]
) -> tuple[float, RangePlan, dict[float, float]]:
    """The best candidate value, its plan, and every candidate's score (first wins ties)."""
    scores: dict[float, float] = {}
    chosen: tuple[float, RangePlan] | None = None
    for value in candidates:
        plan = make_plan(value)
        scores[value] = score(replay, plan)
        if chosen is None or scores[value] > scores[chosen[0]]:
            chosen = (value, plan)
    assert chosen is not None
    return chosen[0], chosen[1], scores
