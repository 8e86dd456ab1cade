"""What a build is asked for (BuildConfig: the recipe and its derived planning settings), what
planning resolved per range (RangeChoices) and what it built per range (BuiltRange)."""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property

from qexport.exporter.kv import BuiltKV
from qexport.exporter.mixed import Allocation
from qexport.passes.gptq import Rounding
from qexport.passes.lowrank import BranchCost
from qexport.passes.observe import Observer
from qexport.passes.plan import QuantConfig, RangePlan, Smooth

from qexport.recipe import Recipe


@dataclass(frozen=True, kw_only=True)
class BuildConfig:
    """What to emit (the recipe) and whether an existing output folder may be replaced. The rest
    is derived from the recipe: the planning settings, granularity, target and K/V precompute."""

    recipe: Recipe = field(default_factory=Recipe)
    force: bool = False
    device: str = "cpu"  # where torch replays calibration prompts (searches, observers, GPTQ inputs, ranges)

    @cached_property
    def quant(self) -> QuantConfig:
        """The planning settings the recipe's techniques turn on (derived once; the recipe is frozen)."""
        settings = self.recipe.settings()
        settings.pop("precompute_kv", None)
        enums = {"smooth": Smooth, "act_observer": Observer, "weight_rounding": Rounding}
        settings = {k: enums[k](v) if k in enums else v for k, v in settings.items()}
        bits, replay = self.recipe.bits, self.recipe.replay.prompts
        techniques = {t.kind: t for t in self.recipe.techniques}
        return QuantConfig(w_bits=bits.weights, a_bits=bits.activations, replay_prompts=replay, techniques=techniques,
                           **settings)  # fmt: skip

    @property
    def ranges(self) -> int | None:
        """K time ranges, or None for one model per step."""
        return self.recipe.granularity.time_ranges

    @property
    def target(self) -> str:
        return self.recipe.target

    @property
    def precompute_kv(self) -> bool:
        """Cross-attention K/V computed once per prompt by kv.onnx (exporter.kv)."""
        return self.recipe.technique("precompute_kv") is not None


@dataclass(frozen=True, kw_only=True)
class RangeChoices:
    """What planning resolved for one range (searches, allocations), recorded in the manifest so a
    re-plan repeats it without searching."""

    alpha: float
    act_shrink: float = 1.0
    group_alpha: dict[str, float] = field(default_factory=dict)  # smoothquant alpha 'layer'
    w_bits_raised: tuple[str, ...] = ()  # mixed_precision: the layers at 8 bits
    learned: dict[str, tuple[float, float]] = field(default_factory=dict)  # learned: linear -> input (scale, zero)


@dataclass(kw_only=True)
class BuiltRange:
    index: int
    steps: list[int]
    model_file: str
    plan: RangePlan
    lowrank: BranchCost = field(default_factory=lambda: BranchCost(macs=0, linear_macs=0, bytes=0))
    rotation_macs: int = 0  # per model call, the online rotations' MatMuls
    kv: BuiltKV | None = None  # --precompute-kv: the kv model every range reads (plan holds its layers too)
    mixed: Allocation | None = None  # --mixed-precision: the measured allocation (None when replanned)
