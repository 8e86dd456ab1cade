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

Both walks say which candidates they will score next (the coarse points; a climb's two neighbours),
none of them a guess: with ``ahead``, the next one is planned on a thread of its own while the one
before is scored, so a GPU build's device scores while its CPU plans (at most one plan ahead).
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
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


def coarse_to_fine(count: int, at: Callable[[int], float], ahead: Callable[[list[int]], None] | None = None) -> int:
    """Where a coarse-to-fine search over `count` candidates ends: the best of every STRIDE-th
    index (and the last), then steps to a strictly better neighbour until there is none. `at`
    scores an index (the caller caches); `ahead`, if given, is told the indices about to be scored."""
    last = count - 1
    coarse = sorted({*range(0, last + 1, STRIDE), last})
    if ahead is not None:
        ahead(coarse)
    return climb(count, at, max(coarse, key=at), ahead)  # max: the first of equals


def climb(count: int, at: Callable[[int], float], i: int, ahead: Callable[[list[int]], None] | None = None) -> int:
    """From index i, step to the better neighbour while it is strictly better; the index it ends at.
    `ahead`, if given, is told the indices about to be scored, in the order they are (the neighbours, then i)."""
    last = count - 1
    while True:
        neighbours = [k for k in (i - 1, i + 1) if 0 <= k <= last]
        if ahead is not None:
            ahead([*neighbours, i])
        j = max(neighbours, key=at)
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
    ahead: bool = False,
) -> tuple[float, RangePlan | None, dict[float, float]]:
    """The best candidate value, its plan, and the scores of the candidates tried. Coarse to fine:
    every STRIDE-th candidate (and the last) first, then a climb from the best of those to a
    better neighbour until none is better: the grid's maximum wherever the score rises then
    falls along the candidates, in about half the simulated runs. The first of equal scores wins.
    known: a candidate already scored (value, score, plan), not run again.
    start: where to climb from instead of the coarse pass (the previous range's choice).
    keep: hold the best plan so far and return it; without, no candidate's plan outlives its score
    and None is returned (a caller that plans the chosen value again: one plan's weights less).
    ahead: plan the next candidate on a thread of its own while one is scored (make_plan must then
    leave the replay's transformer alone: it is scoring meanwhile); the same plans and scores."""
    scores: dict[float, float] = {}
    uploads = Uploads()  # the candidates' shared weights sent to the device once
    chosen: tuple[int, RangePlan | None] | None = None
    if known is not None and known[0] in candidates:
        scores[known[0]] = known[1]
        chosen = (candidates.index(known[0]), known[2] if keep else None)
    upcoming: list[int] = []  # the indices the walk said it scores next
    pending: dict[int, Future[RangePlan]] = {}  # at most one plan in the making

    def plan_next(pool: ThreadPoolExecutor) -> None:
        if not pending:
            nxt = next((k for k in upcoming if candidates[k] not in scores), None)
            if nxt is not None:
                pending[nxt] = pool.submit(make_plan, candidates[nxt])

    def at(i: int, pool: ThreadPoolExecutor | None) -> float:
        nonlocal chosen
        value = candidates[i]
        if value not in scores:
            if pool is None:
                plan = make_plan(value)
            else:
                for k in [k for k in pending if k != i]:  # another's plan: finished first, one planning at a time
                    pending[k].result()
                plan = pending.pop(i).result() if i in pending else make_plan(value)
                if i in upcoming:
                    upcoming.remove(i)
                plan_next(pool)  # the next candidate's plan is made while this one is scored
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

    def walk(pool: ThreadPoolExecutor | None) -> None:
        def told(indices: list[int]) -> None:
            upcoming[:] = indices
            if pool is not None:
                plan_next(pool)

        if start is not None and start in candidates:
            climb(len(candidates), lambda i: at(i, pool), candidates.index(start), told)
        else:
            coarse_to_fine(len(candidates), lambda i: at(i, pool), told)

    if ahead:
        with ThreadPoolExecutor(1, thread_name_prefix="candidate") as pool:
            try:
                walk(pool)
            finally:
                for future in pending.values():  # none is left by a finished walk; an error's is dropped
                    future.cancel()
                pending.clear()
    else:
        walk(None)
    assert chosen is not None  # the best of those tried (the climb's end, or an equal one before it)
    return candidates[chosen[0]], chosen[1], scores
