"""Cross-attention K/V computed once per prompt by kv.onnx instead of at every step."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from qexport.passes.techniques.base import Technique


@dataclass(frozen=True, kw_only=True)
class PrecomputeKV(Technique):
    kind = "precompute_kv"
    summary = "cross-attention K/V once per prompt (kv.onnx), not at every step"

    def settings(self) -> dict[str, Any]:
        return {"precompute_kv": True}
