"""Re-derive the plans of an emitted build (for ``qexport verify out/``): the plan is a pure
function of the statistics, the model and the build config that the manifest records."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from qexport.calib.store import check_matches, load
from qexport.exporter.build import BuildConfig, plan_models
from qexport.passes.gptq import Rounding
from qexport.passes.observe import Observer
from qexport.passes.plan import MIXED_HIGH_BITS, QuantConfig, RangePlan, Smooth
from qexport.targets.profile import TargetProfile, get_profile

from qexport.errors import QexportError
from qexport.models.adapter import ModelAdapter
from qexport.models.registry import load_model


def replan(manifest: dict[str, Any], stats_path: Path | None) -> tuple[ModelAdapter, list[RangePlan], TargetProfile]:
    """The adapter, per-range plans and target of a build, from its manifest and statistics.

    Raises:
        QexportError: statistics not found, or from another model.
    """
    path = Path(stats_path or manifest["calibration"].get("file", ""))
    if not path.is_file():
        raise QexportError(f"statistics {path} of this build are not found; pass --stats run.qstats")
    stats = load(path)
    if stats.header["prompts_hash"] != manifest["calibration"]["prompts_hash"]:
        raise QexportError(f"{path} is not the calibration this build used (prompts hash differs)")
    adapter = load_model(manifest["model_id"])
    check_matches(stats, adapter.model_id, adapter.config_hash(), source=str(path))
    q = manifest["quantization"]
    budget = float(q.get("mixed_precision", {}).get("budget_bits_per_weight", 0))
    ranges = None if q["granularity"] == "timestep-wise" else len(manifest["ranges"])
    alphas = [float(r["alpha"]) for r in manifest["ranges"]]
    quant = QuantConfig(w_bits=q["w_bits"], a_bits=q["a_bits"], smooth=Smooth(q["smooth"]), alpha=alphas[0],
                        asq_stat=q.get("asq_stat", "ema"),
                        weight_clip=q.get("weight_clip", "minmax"),
                        channel_shift=bool(q.get("channel_shift", {}).get("on", False)),
                        smooth_ranges=int(q.get("smooth_ranges", 0)),
                        act_observer=Observer(q.get("act_observer", "minmax")),
                        lowrank=int(q.get("lowrank", 0)), rotate=bool(q.get("rotate", False)),
                        online_rotation=int(q.get("online_rotation", {}).get("block", 0)),
                        rotation_choice=q.get("online_rotation", {}).get("choice", "adaptive"),
                        quantize_attention=bool(q.get("attention", {}).get("quantized", False)),
                        mixed_precision=budget,
                        weight_rounding=Rounding(q.get("weight_rounding", "nearest")),
                        replay_prompts=int(q.get("replay_prompts", 0)) or None)  # fmt: skip
    target = get_profile(manifest["target"])
    config = BuildConfig(quant=quant, ranges=ranges, target=target.name, precompute_kv=bool(manifest.get("kv")))
    shrinks = [float(r.get("act_shrink", 1.0)) for r in manifest["ranges"]]
    group_alphas = [
        {k: float(v) for k, v in r["group_alpha"].items()} for r in manifest["ranges"] if "group_alpha" in r
    ]
    raised = [r["w_bits_raised"] for r in manifest["ranges"] if "w_bits_raised" in r]
    layer_bits = [dict.fromkeys(layers, MIXED_HIGH_BITS) for layers in raised]
    built, _ = plan_models(adapter, stats, config, target, alphas=alphas, shrinks=shrinks, sink=lambda n, m: None,
                           group_alphas=group_alphas or None, layer_bits=layer_bits or None)  # fmt: skip
    return adapter, [b.plan for b in built], target
