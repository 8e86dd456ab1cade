"""Searches scored on the replayed calibration prompts: per range, the candidate whose plan gives
the highest denoiser-output SQNR (torch simulation vs FP) over the range's steps.

- ``--alpha auto``: the SmoothQuant alpha in 0.1..1.0;
- ``--act-observer search``: one shrink ratio of every activation min-max range (after alpha).

Each search goes coarse to fine (``coarse_to_fine``), except the alpha search of a range after the
first, which climbs from the previous range's alpha (``climb``): neighbouring steps choose alike;
on the scores of 20 ranges searched over the whole grid this took 3.8 simulated runs instead of
6.5, at a mean loss of 0.017 dB step SQNR against the grid's maximum (the coarse pass: 0.028 dB).
Started the same way, the range search lost more (0.041 dB against 0.026), and both together
lost 0.37 +- 0.16 dB of final PSNR on tiny-latte's 24 evaluation prompts; it stays coarse to fine.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import ExitStack

import numpy as np
from qexport.exporter.replay import CalibrationReplay
from qexport.exporter.simulate import Uploads, simulated
from qexport.passes.plan import RangePlan

from qexport import heap
from qexport.metrics import sqnr_db

ALPHAS = tuple(round(float(a), 1) for a in np.arange(0.1, 1.01, 0.1))
SHRINKS = (1.0, 0.98, 0.96, 0.94, 0.92, 0.9, 0.87, 0.84, 0.8, 0.75)
STRIDE = 3  # the coarse pass of `best`: 0.1, 0.4, 0.7, 1.0 of ALPHAS; 1.0, 0.94, 0.87, 0.75 of SHRINKS


def score(replay: CalibrationReplay, plan: RangePlan, uploads: Uploads | None = None) -> float:
    """Mean denoiser-output SQNR (dB) of a plan over its range's steps (uploads: as simulated's)."""
    with simulated(replay.adapter.transformer, plan, uploads):
        return float(np.mean([sqnr_db(replay.reference(k), replay.scored(k)) for k in plan.steps]))


def final_score(replay: CalibrationReplay, plan_of_step: Callable[[int], RangePlan]) -> float:
    """SQNR (dB) of the final latents of the whole sampling loop on the replay, each step simulated
    with its plan, vs FP from the same noise: what the end-to-end PSNR measures."""
    with ExitStack() as stack:

        def switch(k: int, t: int) -> None:
            stack.close()
            stack.enter_context(simulated(replay.adapter.transformer, plan_of_step(k)))

        final = replay.sample(on_step=switch).numpy()
    return sqnr_db(replay.final, final)


def coarse_to_fine(count: int, at: Callable[[int], float]) -> int:
    """Where a coarse-to-fine search over `count` candidates ends: the best of every STRIDE-th
    index (and the last), then steps to a strictly better neighbour until there is none. `at`
    scores an index (the caller caches)."""
    last = count - 1
    return climb(count, at, max(sorted({*range(0, last + 1, STRIDE), last}), key=at))  # max: the first of equals


def climb(count: int, at: Callable[[int], float], i: int) -> int:
    """From index i, step to the better neighbour while it is strictly better; the index it ends at."""
    last = count - 1
    while True:
        j = max((k for k in (i - 1, i + 1) if 0 <= k <= last), key=at)
        if at(j) <= at(i):
            return i
        i = j


def best(
    replay: CalibrationReplay,
    candidates: tuple[float, ...],
    make_plan: Callable[[float], RangePlan],
    known: tuple[float, float, RangePlan] | None = None,
    start: float | None = None,
    keep: bool = True,
) -> tuple[float, RangePlan | None, dict[float, float]]:
    """The best candidate value, its plan, and the scores of the candidates tried. Coarse to fine:
    every STRIDE-th candidate (and the last) first, then a climb from the best of those to a
    better neighbour until none is better: the grid's maximum wherever the score rises then
    falls along the candidates, in about half the simulated runs. The first of equal scores wins.
    known: a candidate already scored (value, score, plan), not run again.
    start: where to climb from instead of the coarse pass (the previous range's choice).
    keep: hold the best plan so far and return it; without, no candidate's plan outlives its score
    and None is returned (a caller that plans the chosen value again: one plan's weights less)."""
    scores: dict[float, float] = {}
    uploads = Uploads()  # the candidates' shared weights sent to the device once
    chosen: tuple[int, RangePlan | None] | None = None
    if known is not None and known[0] in candidates:
        scores[known[0]] = known[1]
        chosen = (candidates.index(known[0]), known[2] if keep else None)

    def at(i: int) -> float:
        nonlocal chosen
        value = candidates[i]
        if value not in scores:
            plan = make_plan(value)
            scores[value] = score(replay, plan, uploads)
            if (
                chosen is None
                or scores[value] > scores[candidates[chosen[0]]]
                or (scores[value] == scores[candidates[chosen[0]]] and i < chosen[0])
            ):
                chosen = (i, plan if keep else None)  # only the best plan so far is kept
            del plan  # a candidate not kept is freed before the next one is made
            heap.release()
        return scores[value]

    if start is not None and start in candidates:
        climb(len(candidates), at, candidates.index(start))
    else:
        coarse_to_fine(len(candidates), at)
    assert chosen is not None  # the best of those tried (the climb's end, or an equal one before it)
    return candidates[chosen[0]], chosen[1], scores
