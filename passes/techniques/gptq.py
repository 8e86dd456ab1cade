"""GPTQ weight rounding: error-compensating, from the replayed inputs' Gram matrices."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from qexport.passes.techniques.base import Technique


@dataclass(frozen=True, kw_only=True)
class Gptq(Technique):
    kind = "gptq"
    summary = "round weights column by column, compensating the error with the inputs' Gram matrix"

    def replays(self) -> bool:
        return True

    def settings(self) -> dict[str, Any]:
        return {"weight_rounding": "gptq"}
