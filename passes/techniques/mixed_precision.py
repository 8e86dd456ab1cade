"""Mixed weight precision: layers at the recipe's low width or 8 bits under a budget, the 8-bit
ones chosen by measured sensitivity."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from qexport.passes.rangeplan import MIXED_HIGH_BITS
from qexport.passes.techniques.base import Shape, Technique

from qexport.errors import QexportError


@dataclass(frozen=True, kw_only=True)
class MixedPrecision(Technique):
    kind = "mixed_precision"
    summary = f"raise the most sensitive layers to {MIXED_HIGH_BITS}-bit weights under a bits-per-weight budget"
    excludes = ("precompute_kv",)

    budget: float  # weight bits per parameter, 4..8

    def replays(self) -> bool:
        return True

    def check(self, shape: Shape) -> None:
        super().check(shape)
        if not (shape.w_bits <= 4 and 4.0 <= self.budget <= MIXED_HIGH_BITS):
            raise QexportError(
                f"recipe key 'mixed_precision.budget' mixes 4-bit and {MIXED_HIGH_BITS}-bit weights under a budget "
                f"of 4..{MIXED_HIGH_BITS} bits per weight; it needs bits.weights 2..4, got {shape.w_bits} and a "
                f"budget of {self.budget}"
            )

    def settings(self) -> dict[str, Any]:
        return {"mixed_precision": self.budget}
