"""What every technique config shares: its recipe name, whether it replays calibration prompts,
the checks it makes against the rest of the recipe, and the build settings it turns on."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

from qexport.errors import QexportError


@dataclass(frozen=True, kw_only=True)
class Shape:
    """The rest of a recipe, as a technique's check sees it."""

    w_bits: int
    a_bits: int
    per_step: bool  # one model per denoising step (else time ranges)
    techniques: dict[str, Technique] = field(default_factory=dict)  # kind -> config


@dataclass(frozen=True, kw_only=True)
class Technique:
    """A technique's config: frozen, keyword-only, serialised by qexport.serial with ``_type: kind``."""

    kind: ClassVar[str] = ""
    summary: ClassVar[str] = ""  # one line for `qexport recipes` and docs/recipes.md
    excludes: ClassVar[tuple[str, ...]] = ()  # kinds it cannot be combined with

    def replays(self) -> bool:
        """Whether planning replays calibration prompts for this technique."""
        return False

    def check(self, shape: Shape) -> None:
        """Refuse what does not combine (raises QexportError naming the recipe key)."""
        for other in self.excludes:
            if other in shape.techniques:
                raise QexportError(f"technique {self.kind!r} does not combine with {other!r}; drop one of them")

    def settings(self) -> dict[str, Any]:
        """The build settings (QuantConfig / BuildConfig fields) this technique turns on."""
        return {}
