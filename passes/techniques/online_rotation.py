"""A block-diagonal Hadamard applied online before the quantizer of the other linears' inputs."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from qexport.passes.techniques.base import Shape, Technique

from qexport.errors import QexportError


@dataclass(frozen=True, kw_only=True)
class OnlineRotation(Technique):
    kind = "online_rotation"
    summary = "block-diagonal Hadamard before other inputs' quantizers (adaptive: where it lowers the error)"

    block: int = 64
    choice: Literal["adaptive", "all"] = "adaptive"

    def replays(self) -> bool:
        return True

    def check(self, shape: Shape) -> None:
        super().check(shape)
        if self.block < 2 or self.block & (self.block - 1):
            raise QexportError(f"recipe key 'online_rotation.block' must be a power of two >= 2, got {self.block}")

    def settings(self) -> dict[str, Any]:
        return {"online_rotation": self.block, "rotation_choice": self.choice}
