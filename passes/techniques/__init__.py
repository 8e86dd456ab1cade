"""The technique registry: recipe name (``_type``) -> config class, registered explicitly. The
order is the fixed order in which planning applies them."""

from __future__ import annotations

from qexport.passes.techniques.attention import AttentionQuant
from qexport.passes.techniques.base import Shape, Technique
from qexport.passes.techniques.codebook import CodebookWeights
from qexport.passes.techniques.dynamic import DynamicActivations
from qexport.passes.techniques.gptq import Gptq
from qexport.passes.techniques.group_weights import GroupWeights
from qexport.passes.techniques.head_rotation import HeadRotation
from qexport.passes.techniques.kv import PrecomputeKV
from qexport.passes.techniques.learned import LearnedQuantizers
from qexport.passes.techniques.lowrank import LowRank
from qexport.passes.techniques.mixed_precision import MixedPrecision
from qexport.passes.techniques.observer import ActivationObserver
from qexport.passes.techniques.online_rotation import OnlineRotation
from qexport.passes.techniques.shift import ChannelShift
from qexport.passes.techniques.smoothquant import SmoothQuant
from qexport.passes.techniques.twin_log import TwinLogWeights
from qexport.passes.techniques.weight_clip import WeightClip

ORDER: tuple[type[Technique], ...] = (
    SmoothQuant,
    CodebookWeights,
    TwinLogWeights,
    ChannelShift,
    HeadRotation,
    OnlineRotation,
    WeightClip,
    GroupWeights,
    Gptq,
    LowRank,
    MixedPrecision,
    ActivationObserver,
    DynamicActivations,
    AttentionQuant,
    PrecomputeKV,
    LearnedQuantizers,
)
TECHNIQUES: dict[str, type[Technique]] = {t.kind: t for t in ORDER}

__all__ = ["ORDER", "TECHNIQUES", "Shape", "Technique"]
