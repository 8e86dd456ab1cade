"""Channel shift: centre each quantized input channel on its calibrated midpoint before the
per-tensor quantizer; the bias restores it (folded into the adaLN shift or the value bias)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from qexport.passes.techniques.base import Technique


@dataclass(frozen=True, kw_only=True)
class ChannelShift(Technique):
    kind = "channel_shift"
    summary = "centre each input channel per range before the quantizer; restored exactly by the bias"
    excludes = ("head_rotation", "online_rotation", "lowrank", "attention")

    def settings(self) -> dict[str, Any]:
        return {"channel_shift": True}
