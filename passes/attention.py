"""Static quantization of attention (``--quantize-attention``), graph side and numbers: find the two
attention MatMuls of each attention module (QK^T and PV, both operands activations, a Softmax
between them), plan a per-tensor quantizer for each of their four operands, and insert
QuantizeLinear -> DequantizeLinear in front of them. Leaves the linears to passes.apply."""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs
from qexport.passes.graph import consumers, node_named, producers
from qexport.passes.quant import Grid, qparams
from qexport.passes.rangeplan import ActQuant, AttentionPlan
from qexport.passes.rewrite import AttentionSite, PassConfig
from qexport.targets.profile import TargetProfile

from qexport.errors import QexportError

OPERANDS = ("query", "key", "probs", "value")  # QK^T reads query (scaled) and key^T (scaled); PV reads probs, value
PROBS_RANGE = (0.0, 1.0)  # the softmax output, by construction
_BEFORE_SOFTMAX = ("Add", "Where", "Cast")  # a mask between QK^T and Softmax (Add; Where for boolean masks)
_AFTER_SOFTMAX = ("Where", "Cast", "Dropout")  # NaN guard of boolean masks, casts


def _data(t: gs.Tensor) -> bool:
    return isinstance(t, gs.Variable)


def _two_activations(node: gs.Node) -> bool:
    return node.op == "MatMul" and len(node.inputs) == 2 and all(_data(t) for t in node.inputs)


def _qk_of(softmax: gs.Node, prod: dict[str, gs.Node]) -> gs.Node | None:
    """The MatMul of two activations that feeds the softmax, through a mask Add / Where / Cast."""
    x = softmax.inputs[0]
    for _ in range(4):
        node = prod.get(x.name)
        if node is None:
            return None
        if node.op == "MatMul":
            return node if _two_activations(node) else None
        if node.op not in _BEFORE_SOFTMAX:
            return None
        inner = [t for t in node.inputs if t.name in prod and prod[t.name].op == "MatMul"]
        x = inner[0] if inner else node.inputs[0]
    return None


def _pv_of(softmax: gs.Node, cons: dict[str, list[gs.Node]]) -> gs.Node | None:
    """The MatMul that reads the softmax output as its first operand (through a NaN guard / Cast)."""
    x = softmax.outputs[0]
    for _ in range(4):
        readers = cons.get(x.name, [])
        found = [n for n in readers if _two_activations(n) and n.inputs[0] is x]
        if len(found) == 1:
            return found[0]
        passing = [n for n in readers if n.op in _AFTER_SOFTMAX]
        if len(passing) != 1:
            return None
        x = passing[0].outputs[0]
    return None


def find_attention(graph: gs.Graph, scopes: dict[str, str]) -> dict[str, AttentionSite]:
    """Every attention's QK^T MatMul, Softmax and PV MatMul, keyed by its module.

    Args:
        graph: the FP graph (node names keep the exporter's name scopes).
        scopes: attention module name -> its ONNX name scope (``/transformer/blocks.0/attn1/``).

    Raises:
        QexportError: a Softmax between two activation MatMuls that is under no module's scope,
            or a module without exactly one such pattern (names both).
    """
    prod, cons = producers(graph), consumers(graph)
    found: dict[str, list[AttentionSite]] = {name: [] for name in scopes}
    for softmax in (n for n in graph.nodes if n.op == "Softmax"):
        qk, pv = _qk_of(softmax, prod), _pv_of(softmax, cons)
        if qk is None or pv is None:
            continue
        owner = [m for m, s in scopes.items() if _under(qk.name, s) and _under(pv.name, s)]
        if len(owner) != 1:
            raise QexportError(
                f"attention MatMuls {qk.name!r} / {pv.name!r} are under no attention module's scope "
                f"(expected one of {len(scopes)} modules, e.g. {next(iter(scopes.values()), '-')!r})"
            )
        found[owner[0]].append(AttentionSite(module=owner[0], qk=qk.name, softmax=softmax.name, pv=pv.name))
    for module, sites in found.items():
        if len(sites) != 1:
            raise QexportError(
                f"attention module {module!r}: expected one MatMul -> Softmax -> MatMul pattern under "
                f"{scopes[module]!r}, found {len(sites)}"
            )
    return {module: sites[0] for module, sites in found.items()}


def _under(node_name: str, scope: str) -> bool:
    """The node sits directly in scope (possibly under a wrapper's own prefix), not in a child module."""
    at = node_name.find(scope)
    return at >= 0 and "/" not in node_name[at + len(scope) :]


def plan_attention(
    ranges: dict[str, dict[str, tuple[float, float]]], grid: Grid, pow2: bool, shrink: float = 1.0
) -> dict[str, AttentionPlan]:
    """Per module, a quantizer per operand: query, key and value from their measured min/max (times
    the build's activation shrink), probs from [0, 1] on the same grid (uint8: scale 1/255, zero 0).

    Args:
        ranges: module -> {"query" | "key" | "value": (min, max)} as the attention matmuls read them.
        grid: the activation grid of the build (the linears' inputs use the same).
        pow2: power-of-two scales (the target's rule).
        shrink: the build's activation range shrink (1 = min-max).
    """
    plans = {}
    for module, measured in ranges.items():
        quants = {}
        for operand in OPERANDS:
            lo, hi = (
                PROBS_RANGE if operand == "probs" else (shrink * measured[operand][0], shrink * measured[operand][1])
            )
            scale, zero = qparams(np.asarray(lo), np.asarray(hi), grid, pow2)
            quants[operand] = ActQuant(scale=scale, zero=zero, grid=grid, lo=float(lo), hi=float(hi))
        plans[module] = AttentionPlan(**quants)
    return plans


def _qdq(graph: gs.Graph, x: gs.Tensor, name: str, quant: ActQuant) -> gs.Variable:
    scale = gs.Constant(f"{name}_scale", np.require(np.asarray(quant.scale, dtype=np.float32), requirements="C"))
    zero = gs.Constant(f"{name}_zero", np.require(np.asarray(quant.zero), requirements="C"))
    q = gs.Variable(f"{name}_q", dtype=quant.zero.dtype)
    dq = gs.Variable(f"{name}_dq", dtype=np.float32, shape=x.shape)
    graph.nodes.append(gs.Node("QuantizeLinear", f"{name}_quant", inputs=[x, scale, zero], outputs=[q]))
    graph.nodes.append(gs.Node("DequantizeLinear", f"{name}_dequant", inputs=[q, scale, zero], outputs=[dq]))
    return dq


def quantize_attention(graph: gs.Graph, config: PassConfig, target: TargetProfile) -> gs.Graph:
    """QuantizeLinear -> DequantizeLinear on both operands of each planned attention's QK^T and PV
    MatMuls (tensors ``<module>::<operand>_q``, one Q/DQ pair per operand, read by that MatMul only)."""
    for module, ap in config.plan.attention.items():
        site = config.attention.get(module)
        if site is None:
            raise QexportError(f"attention module {module!r} is planned but has no MatMuls in this graph")
        qk, pv = node_named(graph, site.qk), node_named(graph, site.pv)
        for node, index, operand in ((qk, 0, "query"), (qk, 1, "key"), (pv, 0, "probs"), (pv, 1, "value")):
            node.inputs[index] = _qdq(graph, node.inputs[index], f"{module}::{operand}", ap.operand(operand))
    return graph
