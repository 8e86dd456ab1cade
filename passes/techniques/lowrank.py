"""A rank-r FP branch per linear that compensates its weight-quantization error."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from qexport.passes.lowrank import MAX_RANK
from qexport.passes.techniques.base import Shape, Technique

from qexport.errors import QexportError


@dataclass(frozen=True, kw_only=True)
class LowRank(Technique):
    kind = "lowrank"
    summary = "an FP rank-r branch per linear: output += (x·A)·B, from the SVD of the weight error"

    rank: int = 16

    def check(self, shape: Shape) -> None:
        super().check(shape)
        if not 1 <= self.rank <= MAX_RANK:
            raise QexportError(f"recipe key 'lowrank.rank' must be in 1..{MAX_RANK}, got {self.rank}")

    def settings(self) -> dict[str, Any]:
        return {"lowrank": self.rank}
