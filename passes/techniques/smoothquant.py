"""SmoothQuant: s_j = max|X_j|^α / max|W_j|^(1−α) per input channel, folded into the producer.
ASQ: one s for all steps (aggregated statistics); TSQ: one s per time range (per model)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from qexport.passes.techniques.base import Shape, Technique

from qexport.errors import QexportError


@dataclass(frozen=True, kw_only=True)
class SmoothQuant(Technique):
    kind = "smoothquant"
    summary = "migrate activation outliers into the weights: ASQ (one s for all steps) or TSQ (one per model)"

    mode: Literal["asq", "tsq"]
    alpha: float | Literal["auto", "layer"] = 0.5  # auto: searched per range (ASQ: one for all); layer: per group
    statistic: Literal["ema", "max", "range"] = "ema"  # ASQ's per-channel aggregate over the steps
    shared_ranges: int = 0  # TSQ per step: one s per this many contiguous step ranges (0 = per model)

    def replays(self) -> bool:
        return self.alpha in ("auto", "layer")

    def check(self, shape: Shape) -> None:
        super().check(shape)
        if isinstance(self.alpha, float) and not 0.0 < self.alpha <= 1.0:
            raise QexportError(f"recipe key 'smoothquant.alpha' must be in (0, 1], 'auto' or 'layer', got {self.alpha}")
        if self.statistic != "ema" and self.mode != "asq":
            raise QexportError(f"recipe key 'smoothquant.statistic' {self.statistic!r} is ASQ's; it needs mode 'asq'")
        if self.shared_ranges < 0:
            raise QexportError(
                f"recipe key 'smoothquant.shared_ranges' must be 0 (off) or more, got {self.shared_ranges}"
            )
        if self.shared_ranges and (self.mode != "tsq" or not isinstance(self.alpha, float) or not shape.per_step):
            raise QexportError(
                "recipe key 'smoothquant.shared_ranges' gives TSQ one smoothing vector per K step ranges; it needs "
                "mode 'tsq', a fixed alpha and one model per step (time_ranges null)"
            )

    def settings(self) -> dict[str, Any]:
        fixed = isinstance(self.alpha, float)
        return {"smooth": self.mode, "alpha": self.alpha if fixed else 0.5, "alpha_auto": self.alpha == "auto",
                "alpha_layer": self.alpha == "layer", "asq_stat": self.statistic,
                "smooth_ranges": self.shared_ranges}  # fmt: skip
