"""What the graph passes of one range read: its plan, its input-sharing groups, each layer's MatMul
node and each attention module's MatMuls (node names)."""

from __future__ import annotations

from dataclasses import dataclass, field

from qexport.passes.analyze import Group
from qexport.passes.rangeplan import RangePlan


@dataclass(frozen=True, kw_only=True)
class AttentionSite:
    """One attention module's MatMuls in the graph (node names)."""

    module: str
    qk: str
    softmax: str
    pv: str


@dataclass(frozen=True, kw_only=True)
class KeptBinding:
    """Where one float-kept nn.Linear or nn.Embedding of the model lives in the FP graph."""

    module: str
    node: str  # its MatMul, Gemm or Gather node
    weight: str  # the constant that node reads as its weight (MatMul: W^T; Gather: the table)


@dataclass(frozen=True, kw_only=True)
class PassConfig:
    """What the passes of one range need: its plan, the groups and each layer's MatMul node."""

    plan: RangePlan
    groups: list[Group]
    nodes: dict[str, str]  # layer -> MatMul node name
    attention: dict[str, AttentionSite] = field(default_factory=dict)  # attention module -> its MatMuls
    kept: dict[str, KeptBinding] = field(default_factory=dict)  # float-kept module -> its node (weight-only int8)
