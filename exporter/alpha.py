"""``--alpha auto``: per range, the SmoothQuant alpha in 0.1..1.0 whose plan gives the highest
denoiser-output SQNR (torch simulation vs FP) on the FP trajectories of calibration prompts."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from qexport.exporter.simulate import simulated
from qexport.passes.plan import RangePlan

from qexport.metrics import sqnr_db
from qexport.models.adapter import ModelAdapter
from qexport.models.sampler import SamplingConfig, sample

ALPHAS = tuple(round(float(a), 1) for a in np.arange(0.1, 1.01, 0.1))


class AlphaSearch:
    """FP inputs and outputs per step, computed once, to score candidate plans."""

    def __init__(self, adapter: ModelAdapter, prompts: list[str], timesteps: list[int], cfg: float) -> None:
        self.adapter = adapter
        self.denoiser = adapter.denoiser()
        self.timesteps = timesteps
        self.cond = torch.cat([adapter.conditioner.encode(prompts), adapter.conditioner.null(len(prompts))])
        xs: list[torch.Tensor] = []
        handle = adapter.transformer.register_forward_pre_hook(lambda m, args: xs.append(args[0].detach().clone()))
        try:
            sample(
                adapter,
                adapter.conditioner.encode(prompts),
                [0] * len(prompts),
                SamplingConfig(steps=len(timesteps), cfg=cfg),
            )
        finally:
            handle.remove()
        self.inputs = xs
        with torch.no_grad():
            self.reference = [self._run(k) for k in range(len(timesteps))]

    def _run(self, k: int) -> np.ndarray:
        t = torch.full((len(self.cond),), self.timesteps[k], dtype=torch.long)
        return self.denoiser(self.inputs[k], t, self.cond).numpy()

    def score(self, plan: RangePlan) -> float:
        """Mean SQNR (dB) over the range's steps."""
        with torch.no_grad(), simulated(self.adapter.transformer, plan):
            return float(np.mean([sqnr_db(self.reference[k], self._run(k)) for k in plan.steps]))

    def best(self, make_plan: Callable[[float], RangePlan]) -> tuple[float, RangePlan, dict[float, float]]:
        """The best alpha, its plan, and every candidate's score."""
        scores: dict[float, float] = {}
        best: tuple[float, RangePlan] | None = None
        for alpha in ALPHAS:
            plan = make_plan(alpha)
            scores[alpha] = self.score(plan)
            if best is None or scores[alpha] > scores[best[0]]:
                best = (alpha, plan)
        assert best is not None
        return best[0], best[1], scores
