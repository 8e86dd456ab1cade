"""Per-output-channel weight clip ratio searched for the least squared quantization error."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from qexport.passes.techniques.base import Technique


@dataclass(frozen=True, kw_only=True)
class WeightClip(Technique):
    kind = "weight_clip"
    summary = "clip each weight row's range to the ratio with the least squared error"

    method: Literal["mse"] = "mse"

    def settings(self) -> dict[str, Any]:
        return {"weight_clip": self.method}
