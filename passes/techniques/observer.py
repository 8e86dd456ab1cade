"""Activation ranges from replayed calibration samples instead of the calibrated min/max:
percentile or MSE-clipped ranges, or min/max shrunk by the ratio with the best output SQNR."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from qexport.passes.observe import observe
from qexport.passes.rangeplan import GroupStep, QuantConfig
from qexport.passes.techniques.base import Technique


@dataclass(frozen=True, kw_only=True)
class ActivationObserver(Technique):
    kind = "activation_observer"
    summary = "activation ranges from replayed samples: percentile, MSE clip, or a per-range shrink search"

    method: Literal["percentile", "mse", "search"] = "search"

    def replays(self) -> bool:
        return True

    def settings(self) -> dict[str, Any]:
        return {"act_observer": self.method}

    @classmethod
    def wants_samples(cls, config: QuantConfig, fold: str) -> bool:
        return config.act_observer.samples

    @classmethod
    def plan_group(cls, step: GroupStep) -> None:
        """The observer's range from the samples, then the range shrink (1 unless searched)."""
        config, target = step.rng.config, step.rng.target
        if config.act_observer.samples:
            step.lo, step.hi = observe(step.values, step.lo, step.hi, step.rng.a_grid, config.act_observer,
                                       target.pow2_scales)  # fmt: skip
        step.unshrunk = (step.lo, step.hi)
        step.lo, step.hi = step.lo * config.act_shrink, step.hi * config.act_shrink
