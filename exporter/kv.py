"""``build --precompute-kv``: split each prepared FP export into its per-step part and the kv part
(``passes.kv``), the kv model's quantization config, the MACs the split moves out of every step,
and the manifest's ``kv`` entry. Planning and the passes themselves are the build's own."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

import onnx
import onnx_graphsurgeon as gs
from qexport.exporter.fp_export import FPExport, stamp
from qexport.exporter.shapes import infer_shapes
from qexport.passes.kv import KVSplit, find_kv, kv_graph, matmul_macs, step_graph
from qexport.passes.lowrank import BranchCost
from qexport.passes.plan import QuantConfig, RangePlan

from qexport.errors import QexportError

KV_FILE = "kv.onnx"


@dataclass(frozen=True, kw_only=True)
class KVCost:
    """MatMul / Gemm MACs of the FP graphs (CFG batch 2; low-rank branches not counted)."""

    removed_per_call: int  # no longer in each per-step model call
    step_per_call: int  # what each per-step model call still computes
    kv_per_prompt: int  # kv.onnx, once per prompt


@dataclass(frozen=True, kw_only=True)
class KVExport:
    """One prepared export, split: the per-step part (K/V as inputs) and the kv part (cond -> K/V)."""

    step: FPExport
    kv: FPExport
    split: KVSplit
    cost: KVCost


@dataclass(kw_only=True)
class BuiltKV:
    model_file: str
    plan: RangePlan
    inputs: list[dict[str, Any]]
    outputs: list[dict[str, Any]]
    cost: KVCost
    lowrank: BranchCost = field(default_factory=lambda: BranchCost(macs=0, linear_macs=0, bytes=0))


def split_export(fp: FPExport, model_id: str) -> KVExport:
    """Cut a prepared FP export (constants folded, shapes inferred) at the K/V projections.

    Raises:
        QexportError: no quantized linear reads the conditioning alone (no cross-attention).
    """
    graph = gs.import_onnx(fp.model)
    split = find_kv(graph, {layer: b.node for layer, b in fp.bindings.items()})
    if not split.layers:
        raise QexportError(
            f"--precompute-kv: no quantized linear of {model_id} reads the text conditioning alone (the model has "
            "no cross-attention K/V projections to precompute); build without --precompute-kv"
        )
    before = matmul_macs(graph)
    step = _reinfer(step_graph(graph, split))
    kv = _reinfer(kv_graph(gs.import_onnx(fp.model), split))
    kv_layers = set(split.names)
    step_fp = FPExport(
        model=step,
        input_names=[i.name for i in step.graph.input],
        bindings={k: b for k, b in fp.bindings.items() if k not in kv_layers},
    )
    kv_fp = FPExport(
        model=kv,
        input_names=[i.name for i in kv.graph.input],
        bindings={k: b for k, b in fp.bindings.items() if k in kv_layers},
    )
    after = matmul_macs(gs.import_onnx(step))
    cost = KVCost(removed_per_call=before - after, step_per_call=after, kv_per_prompt=matmul_macs(gs.import_onnx(kv)))
    return KVExport(step=step_fp, kv=kv_fp, split=split, cost=cost)


def kv_quant(quant: QuantConfig) -> QuantConfig:
    """The kv model's config: the build's bits, smoothing, alpha, observer and rank, planned once
    over all calibrated steps (its input is the same at every step); no per-range search (an
    ``--alpha auto`` build keeps alpha's start value there, an activation-shrink search 1.0) and
    no rotation (it has no attention output)."""
    return replace(quant, alpha_auto=False, act_shrink=1.0, rotate=False)


def with_kv(plan: RangePlan, kv: RangePlan | None) -> RangePlan:
    """The plan of everything one step of a range computes: its own layers and kv.onnx's (what the
    torch simulation patches)."""
    if kv is None:
        return plan
    return replace(plan, layers={**plan.layers, **kv.layers}, weight_only=(*plan.weight_only, *kv.weight_only))


def io_specs(values: Any) -> list[dict[str, Any]]:
    """name / shape / dtype of graph inputs or outputs."""
    out = []
    for v in values:
        t = v.type.tensor_type
        dtype = onnx.helper.tensor_dtype_to_np_dtype(t.elem_type)
        out.append({"name": v.name, "shape": [d.dim_value for d in t.shape.dim], "dtype": str(dtype)})
    return out


def kv_manifest(kv: BuiltKV, quant: QuantConfig) -> dict[str, Any]:
    """The manifest's ``kv`` entry (see docs/build.md)."""
    return {
        "model": kv.model_file,
        "inputs": kv.inputs,
        "outputs": kv.outputs,
        "layers": list(kv.plan.layers),
        "steps": "all",
        "smooth": quant.smooth.value,
        "alpha": kv.plan.alpha,
        "folds": dict(kv.plan.folds),
        "macs_per_prompt": kv.cost.kv_per_prompt,
        "macs_removed_per_call": kv.cost.removed_per_call,
        "step_macs_per_call": kv.cost.step_per_call,
        "lowrank_cost": {"macs_per_prompt": kv.lowrank.macs, "bytes": kv.lowrank.bytes},
    }


def _reinfer(graph: gs.Graph) -> onnx.ModelProto:
    model = gs.export_onnx(graph)
    stamp(model)
    return infer_shapes(model)
