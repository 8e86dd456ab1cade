"""Group-wise weights (Q-DiT): one scale and zero point per output channel and group of g
consecutive input channels, instead of one per output channel, so an outlier input channel widens
the step of its own group only.

Q-DiT (Chen et al., "Q-DiT: Accurate Post-Training Quantization for Diffusion Transformers"; its
paper is not among this project's seeds, so no section is cited) quantizes each group of a weight
row with its own min-max parameters and searches the group size per layer; here one size for every
linear (the search is not implemented). Emitted as opset 21's blocked DequantizeLinear (``axis`` 0, the input
channels of W^T, ``block_size`` g). With GPTQ the groups' parameters are fixed from the weight
before rounding ("static groups") and each row rounds on its own group's grid.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from qexport.passes.rangeplan import QuantConfig, RangePlan
from qexport.passes.techniques.base import Shape, Technique

from qexport.errors import QexportError


@dataclass(frozen=True, kw_only=True)
class GroupWeights(Technique):
    kind = "group_weights"
    summary = "Q-DiT's group-wise weights: one scale per output channel and group of input channels (blocked QDQ)"
    excludes = ("weight_clip", "mixed_precision", "online_rotation", "dynamic_activations")

    size: int = 64  # input channels per group

    def check(self, shape: Shape) -> None:
        super().check(shape)
        if self.size < 2:
            raise QexportError(f"recipe key 'group_weights.size' must be 2 or more input channels, got {self.size}")

    def settings(self) -> dict[str, Any]:
        return {"w_group": self.size}

    @classmethod
    def check_widths(cls, config: QuantConfig, widths: Mapping[str, int]) -> None:
        """Every quantized linear's input width a multiple of the group size (before weights load)."""
        if not config.w_group:
            return
        bad = {layer: c for layer, c in widths.items() if c % config.w_group}
        if bad:
            layer, c = next(iter(bad.items()))
            sizes = [g for g in (256, 128, 96, 64, 48, 32, 16) if all(w % g == 0 for w in widths.values())]
            hint = f"sizes that divide every width: {', '.join(map(str, sizes))}" if sizes else "no common size"
            raise QexportError(f"recipe key 'group_weights.size' is {config.w_group}, which does not divide the "
                               f"input width {c} of {layer} ({len(bad)} layer(s) so); {hint}")  # fmt: skip

    @classmethod
    def record(cls, config: QuantConfig, plans: list[RangePlan]) -> dict[str, Any]:
        return {cls.kind: config.w_group} if config.w_group else {}  # absent: a build's record as before

    @classmethod
    def describe(cls, quantization: Mapping[str, Any]) -> list[str]:
        size = quantization.get(cls.kind)
        return [f"  groups     weights per {size} input channels and output channel (blocked)"] if size else []
