"""A per-head Hadamard rotation folded into the value projections and attention outputs."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from qexport.passes.techniques.base import Technique


@dataclass(frozen=True, kw_only=True)
class HeadRotation(Technique):
    kind = "head_rotation"
    summary = "per-head Hadamard folded around attention (value projection and output), exact"

    def replays(self) -> bool:
        return True

    def settings(self) -> dict[str, Any]:
        return {"rotate": True}
