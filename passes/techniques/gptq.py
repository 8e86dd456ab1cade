"""GPTQ weight rounding: error-compensating, from the replayed inputs' Gram matrices."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from qexport.passes.gptq import Rounding, input_hessian
from qexport.passes.rangeplan import GroupStep
from qexport.passes.techniques.base import Shape, Technique

from qexport.errors import QexportError


@dataclass(frozen=True, kw_only=True)
class Gptq(Technique):
    kind = "gptq"
    summary = "round weights column by column, compensating the error with the inputs' Gram matrix"

    # how a per-range alpha search scores its candidates: their weights rounded to nearest (GPTQ then
    # runs once, for the chosen alpha) or by GPTQ (one solve per layer and candidate; slower, and what
    # the 4-bit presets use: docs/techniques/gptq.md)
    alpha_scoring: Literal["nearest", "gptq"] = "nearest"

    def replays(self) -> bool:
        return True

    def check(self, shape: Shape) -> None:
        super().check(shape)
        sq = shape.techniques.get("smoothquant")
        if self.alpha_scoring == "gptq" and (sq is None or getattr(sq, "alpha", None) != "auto"):
            raise QexportError(
                "recipe key 'gptq.alpha_scoring' sets how an alpha search scores its candidates; it needs "
                "smoothquant.alpha auto"
            )

    def settings(self) -> dict[str, Any]:
        return {"weight_rounding": "gptq", "alpha_scoring": self.alpha_scoring}

    @classmethod
    def plan_group(cls, step: GroupStep) -> None:
        """H of the input the group's quantizer sees (divided by s, rotated); its linears are then
        rounded by GPTQ against it."""
        rng, first = step.rng, step.g.layers[0]
        if rng.config.weight_rounding != Rounding.GPTQ:
            return
        if rng.grams is None or first not in rng.grams:
            raise QexportError(f"gptq has no input Gram matrix of {first} (replay calibration prompts for it)")
        rotation = step.rotation if step.rotation is not None else step.online
        step.hessian = input_hessian(rng.grams[first], step.divisor, rotation)
