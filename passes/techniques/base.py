"""What every technique shares: its recipe name, whether it replays calibration prompts, the
checks it makes against the rest of the recipe, the build settings it turns on, and its steps.

Steps run for every registered technique, in the registry's order, and act only where the
build's settings (a QuantConfig: the technique's own config under ``config.techniques``, or the
settings it turned on) ask for it:

- ``check_widths(config, widths)``: refuse what the linears' input widths do not allow (before loading);
- ``wants_samples(config, fold)``: whether a group of that fold kind needs replayed inputs;
- ``plan_fold(step)``: per input-sharing group, before the quantizer's range is taken (smoothing);
- ``plan_group(step)``: per group, refining what the quantizer sees (shifts, rotations, observers);
- ``plan_layer(step)``: per linear, after its weight is quantized (restoring biases, branches);
- ``rewrites``: graph passes by stage (passes.apply.STAGES), each ``(graph, PassConfig, target)``;
- ``record(config, plans)``: the technique's entries in the manifest's quantization record;
- ``describe(quantization)``: its lines in the build summary, from that record.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

import onnx_graphsurgeon as gs
from qexport.passes.rangeplan import GroupStep, LayerStep, QuantConfig, RangePlan
from qexport.passes.rewrite import PassConfig
from qexport.targets.profile import TargetProfile

from qexport.errors import QexportError

GraphPass = Callable[[gs.Graph, PassConfig, TargetProfile], gs.Graph]


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

    rewrites: ClassVar[Mapping[str, GraphPass]] = {}

    @classmethod
    def wants_samples(cls, config: QuantConfig, fold: str) -> bool:
        """Whether planning a group of this fold kind needs its replayed inputs."""
        return False

    @classmethod
    def check_widths(cls, config: QuantConfig, widths: Mapping[str, int]) -> None:
        """Refuse, before the weights load, what the quantized linears' input widths do not allow."""

    @classmethod
    def plan_fold(cls, step: GroupStep) -> None:
        """Transform a group's input before its range is taken."""

    @classmethod
    def plan_group(cls, step: GroupStep) -> None:
        """Refine what a group's quantizer sees."""

    @classmethod
    def plan_layer(cls, step: LayerStep) -> None:
        """Complete a linear's plan after its weight is quantized."""

    @classmethod
    def record(cls, config: QuantConfig, plans: list[RangePlan]) -> dict[str, Any]:
        """Entries of the manifest's quantization record."""
        return {}

    @classmethod
    def describe(cls, quantization: Mapping[str, Any]) -> list[str]:
        """Build-summary lines from the manifest's quantization record."""
        return []
