"""Static Q/DQ on both operands of QK^T and PV, so the attention matmuls run in integer too."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

from qexport.passes.attention import quantize_attention
from qexport.passes.techniques.base import GraphPass, Technique


@dataclass(frozen=True, kw_only=True)
class AttentionQuant(Technique):
    kind = "attention"
    summary = "quantize Q, K, V and the softmax output; ranges from replayed prompts"
    rewrites: ClassVar[Mapping[str, GraphPass]] = {"operands": quantize_attention}

    def replays(self) -> bool:
        return True

    def settings(self) -> dict[str, Any]:
        return {"quantize_attention": True}
