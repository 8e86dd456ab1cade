"""``build``: from a .qstats file, export the model per range, run the passes, and emit one QDQ
ONNX per range (per step for TSW) with shared weights and manifest.json; the output folder
appears only when everything is written (temp folder, then rename)."""

from __future__ import annotations

import gc
import json
import logging
import time
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from qexport.calib.store import QStats, check_matches, load
from qexport.exporter.alpha import layer_alphas, shared_alpha
from qexport.exporter.attention import attention_ids, attention_scopes
from qexport.exporter.built import BuildConfig, BuiltRange, RangeChoices
from qexport.exporter.conditioning import export_conditioning
from qexport.exporter.emit import EmitSummary, ModelWriter, Views, emitted_tensors, layer_ids
from qexport.exporter.fp_export import (
    FPExport,
    LinearBinding,
    StepGraphs,
    export_graph,
    load_graph,
    prepare_graph,
    stamp,
)
from qexport.exporter.kv import KV_FILE, BuiltKV, KVExport, io_specs, kv_manifest, kv_quant, split_export, with_kv
from qexport.exporter.learn import Learned, learn, warm_start, with_learned
from qexport.exporter.manifest import make_manifest, write_manifest
from qexport.exporter.mixed import Allocation, choose_bits, raised
from qexport.exporter.replay import CalibrationReplay, on_device, overlapped, replay_count, tensor_ranges
from qexport.exporter.search import ALPHAS, SHRINKS, best
from qexport.exporter.shapes import infer_shapes
from qexport.passes.analyze import FOLDS, Group, find_groups
from qexport.passes.apply import pack_low_bit, run_passes
from qexport.passes.attention import find_attention, plan_attention
from qexport.passes.close import plan_outputs
from qexport.passes.fp_weights import FPWeights, graph_weights, release, restore
from qexport.passes.gptq import Gram, Memo, Rounding
from qexport.passes.graph import node_named
from qexport.passes.integer_only import integer_only, observed_tensors
from qexport.passes.lowrank import BranchCost, branch_cost
from qexport.passes.observe import Observer
from qexport.passes.plan import MIXED_HIGH_BITS, QuantConfig, RangePlan, Smooth, plan_range, with_shrink
from qexport.passes.rewrite import KeptBinding, PassConfig
from qexport.passes.smoothing import smoothing_steps
from qexport.passes.specialise import copy_graph
from qexport.passes.techniques import ORDER
from qexport.passes.techniques.dynamic import DynamicActivations
from qexport.passes.techniques.learned import LearnedQuantizers
from qexport.passes.weight_only import surviving
from qexport.targets.catalog import PROFILES, get_profile
from qexport.targets.legality import LegalityReport, check_model
from qexport.targets.profile import TargetProfile

from qexport import heap, serial
from qexport.errors import QexportError
from qexport.media import atomic_write, written_whole
from qexport.models.adapter import ModelAdapter
from qexport.models.registry import ModelRequest, check_conditions, load_model
from qexport.progress import Progress, report
from qexport.recipe import FloatWeights, Recipe
from qexport.stages import stage

log = logging.getLogger(__name__)
LEGALITY_FILE = "legality.json"


@dataclass(kw_only=True)
class BuildResult:
    folder: Path
    adapter: ModelAdapter
    stats: QStats
    ranges: list[BuiltRange]
    emit: EmitSummary
    manifest: dict
    seconds: float
    legality: list[LegalityReport] = field(default_factory=list)


def split_ranges(steps: int, ranges: int | None) -> list[list[int]]:
    """Contiguous groups of step indices: one per step (None) or `ranges` groups."""
    if ranges is None:
        return [[i] for i in range(steps)]
    if not 1 <= ranges <= steps:
        raise QexportError(
            f"recipe key 'granularity.time_ranges' must be in 1..{steps} (the calibrated steps), got {ranges}"
        )
    return [[int(i) for i in chunk] for chunk in np.array_split(np.arange(steps), ranges)]


def planning_replays(quant: QuantConfig) -> bool:
    """Whether planning a range reads the replay even when the searches' choices are given (a
    re-plan): layer samples, attention ranges, GPTQ's Gram matrices."""
    return needs_samples(quant) or quant.quantize_attention or gptq(quant)


def needs_samples(quant: QuantConfig) -> bool:
    """Whether planning needs replayed layer inputs (a technique asks for them for some group)."""
    return any(t.wants_samples(quant, fold) for t in ORDER for fold in FOLDS)


def gptq(quant: QuantConfig) -> bool:
    """Whether weights are rounded by GPTQ (needs the replayed inputs' Gram matrices)."""
    return quant.weight_rounding == Rounding.GPTQ


def check_widths(quant: QuantConfig, stats: QStats) -> None:
    """The techniques' checks of the quantized linears' input widths, before the weights load."""
    widths = {layer: s.channels for layer, s in stats.layers.items()}
    for technique in ORDER:
        technique.check_widths(quant, widths)


def _check_runtime_techniques(config: BuildConfig, target: TargetProfile) -> None:
    """Refuse techniques whose emitted form the target does not run: run-time activation quantizers,
    group-wise (blocked) weights, weights decoded from a lookup, an online rotation transform."""
    dynamic = config.recipe.technique(DynamicActivations.kind)
    if isinstance(dynamic, DynamicActivations) and dynamic.granularity not in target.dynamic_activations:
        names = [p.name for p in PROFILES.values() if dynamic.granularity in p.dynamic_activations]
        raise QexportError(f"target {target.name} fixes every activation scale at build time; dynamic_activations "
                           f"(a reference, not NPU-static) needs a runtime that computes them: target "
                           f"{' or '.join(names)}")  # fmt: skip
    transform = config.quant.rotation_transform
    if config.quant.online_rotation and transform not in target.online_transforms:
        runs = ", ".join(target.online_transforms)
        raise QexportError(f"target {target.name} does not run the online rotation transform '{transform}' "
                           f"(it runs: {runs}); set online_rotation.transform=hadamard")  # fmt: skip
    coded = [kind for kind in ("codebook_weights", "twin_log_weights") if config.recipe.technique(kind) is not None]
    if coded and not target.lookup_weights:
        raise QexportError(f"target {target.name} runs a linear whose weights are codes into a lookup ({coded[0]}) "
                           "as a float MatMul, not as a quantized linear (measured on its backend); drop "
                           f"{coded[0]} or build for target ort-cpu")  # fmt: skip
    storage = target.weight_type(config.recipe.bits.weights)
    if config.quant.w_group and storage not in target.blocked_weights:
        runs = ", ".join(target.blocked_weights) or "none"
        raise QexportError(f"target {target.name} does not run group-wise (blocked) {storage} weights (it runs: "
                           f"{runs}); drop group_weights or change bits.weights")  # fmt: skip


def check_request(config: BuildConfig, out: Path) -> TargetProfile:
    """Everything that can be refused before loading weights (the recipe's own rules are checked
    when it is made)."""
    config.recipe.validate()
    target = get_profile(config.target)
    target.weight_type(config.recipe.bits.weights)
    target.activation_type(config.recipe.bits.activations)
    if config.recipe.technique("mixed_precision") is not None:
        target.weight_type(MIXED_HIGH_BITS)
    _check_runtime_techniques(config, target)
    if target.integer_activations and config.precompute_kv:
        raise QexportError(f"target {target.name} (integer-only) cannot be built with precompute_kv: its kv.onnx "
                           "is not quantized end to end; drop precompute_kv or pick target qnn-htp")  # fmt: skip
    if target.integer_activations and target.activation_type(config.recipe.bits.activations) != (
        target.integer_activations
    ):  # a unit between two activations (attention's matmuls) would read one type and write another
        raise QexportError(
            f"target {target.name} quantizes every activation to {target.integer_activations}, so its linears "
            f"take {target.integer_activations} activations too; set bits.activations=16 (e.g. --recipe qnn-w8a16)"
        )
    if out.exists() and not config.force:
        raise QexportError(f"output folder {out} exists; pass --force to replace it")
    return target


def build(
    stats_path: Path, out: Path, config: BuildConfig, progress: Progress | None = None,
    model: ModelRequest | None = None,
) -> BuildResult:  # fmt: skip
    """Build the emitted models.

    Args:
        model: which model to load for the statistics' model id (a folder only with consent, see
            ModelRequest) and the conditions (verification's prompt) it must take; default: none.

    Raises:
        QexportError: bad request, a model folder loaded without consent, statistics from another
            model, a condition the model does not take, an unmappable layer.

    Its stages (load, FP export, FP replay, searches, GPTQ, passes, legality and write) are timed on
    the caller's qexport.stages clock, if one runs.
    """
    request = model or ModelRequest()
    start = time.perf_counter()
    target = check_request(config, out)
    stats = load(stats_path)
    check_widths(config.quant, stats)
    split_ranges(stats.steps, config.ranges)  # refuse a bad time range count before loading weights
    if config.quant.smooth_ranges:
        smoothing_steps([0], stats.steps, config.quant.smooth_ranges)  # refuse K above the calibrated steps
    replayed = config.recipe.replaying() + ([f"{config.target} target"] if config.recipe.target_replays() else [])
    if replayed and not stats.header.get("prompt_texts"):
        raise QexportError(
            f"{stats_path} does not record its prompts, which the recipe's {', '.join(replayed)} need (they "
            "replay calibration prompts); recalibrate it with this qexport"
        )
    recorded = len(stats.header.get("prompt_texts", []))
    replays = replay_count(config.quant.replay_prompts, recorded, str(stats_path)) if replayed else 0
    model_id = request.model_id(stats.model_id, str(stats_path), "calibrated there")
    check_conditions(model_id, request.conditions)  # verification's prompt, before the weights load
    with stage("load"):
        adapter = load_model(model_id)
    check_matches(stats, adapter.model_id, adapter.config_hash(), source=str(stats_path))
    with written_whole(out) as tmp:
        ids = layer_ids(list(stats.layers))
        attn_ids = attention_ids(adapter.transformer) if config.quant.quantize_attention else {}
        built, emit, legality = emit_models(adapter, stats, config, target, tmp, {**ids, **attn_ids}, progress)
        manifest = make_manifest(adapter, stats, config, target, built, emit)
        manifest["recipe"] = config.recipe.to_dict()
        manifest["choices"] = [serial.to_dict(choices_of(r, config.quant)) for r in built]
        manifest["quantization"]["replay_prompts"] = replays
        manifest["legality"] = legality_record(legality)
        manifest["conditioning"] = export_conditioning(adapter, tmp)
        manifest["calibration"]["file"] = str(Path(stats_path).resolve())
        manifest["layer_ids"] = ids
        if built[0].kv is not None:
            manifest.update(kv=kv_manifest(built[0].kv, config.quant))
        if attn_ids:
            manifest["attention_ids"] = attn_ids
        write_manifest(tmp, manifest)
    return BuildResult(
        folder=out,
        adapter=adapter,
        stats=stats,
        ranges=built,
        emit=emit,
        manifest=manifest,
        seconds=time.perf_counter() - start,
        legality=legality,
    )


def emit_models(
    adapter: ModelAdapter, stats: QStats, config: BuildConfig, target: TargetProfile, folder: Path,
    ids: dict[str, str], progress: Progress | None = None,
) -> tuple[list[BuiltRange], EmitSummary, list[LegalityReport]]:  # fmt: skip
    """Plan and transform every range, check each model's legality and write it into folder (shared
    weights; legality.json too); returns the built ranges, the emission summary and the reports.

    Raises:
        QexportError: a model breaks a rule of the target.
    """
    writer = ModelWriter(folder, ids)
    legality: list[LegalityReport] = []

    def sink(name: str, model: onnx.ModelProto, plan: RangePlan | None) -> None:
        # legality before emission renames nodes and tensors; each model is then written at
        # once, so a full-size build never holds them all
        with stage("legality and write"):
            legality.extend(check_legality([(name, model)], target))
            writer.add(name, model)
            if plan is not None:
                point_into_file(plan, writer.written(), ids)

    try:
        built, _ = plan_models(adapter, stats, config, target, progress, sink=sink)
    finally:
        emit = writer.close()
    reports = [r.to_json() for r in legality]
    atomic_write(folder / LEGALITY_FILE, lambda p: Path(p).write_text(json.dumps(reports, indent=1, allow_nan=False)))
    return built, emit, legality


def point_into_file(plan: RangePlan, written: dict[str, np.ndarray], ids: dict[str, str], check: bool = False) -> None:
    """Each int8 weight of the plan that the weights file holds becomes a read-only view of it, so
    the plans kept for verification do not hold one copy a step (TSQ's per-step weights grew
    memory with the steps; int4 weights are packed there and stay in memory). check: only where
    the file holds exactly the plan's values (a re-plan on another CPU may round a weight apart)."""
    for layer, lp in plan.layers.items():
        view = written.get(f"{ids.get(layer)}:w_q")
        if view is None or view.dtype != lp.w_q.dtype or view.shape != lp.w_q.shape:
            continue
        if not check or _equal(view, lp.w_q):
            lp.w_q = view


def legality_record(legality: list[LegalityReport]) -> dict[str, Any]:
    """The manifest's legality entry: the report file and each model's summary."""
    return {"file": LEGALITY_FILE, "models": [r.to_json(nodes=False) for r in legality]}


def choices_of(built: BuiltRange, quant: QuantConfig) -> RangeChoices:
    """The resolved choices of one built range."""
    plan = built.plan
    bits = tuple(raised(plan, quant.w_bits)) if quant.mixed_precision else ()
    return RangeChoices(alpha=plan.alpha, act_shrink=plan.act_shrink, group_alpha=plan.group_alpha, w_bits_raised=bits,
                        learned=dict(plan.parts.get("learned", {})))  # fmt: skip


AdapterLoader = Callable[[QStats, str, str], ModelAdapter]  # (statistics, their file, model id) -> the model


def replan(
    manifest: dict[str, Any], stats_path: Path | None, model: ModelRequest | None = None,
    load_adapter: AdapterLoader | None = None, folder: Path | None = None, device: str = "cpu",
) -> tuple[ModelAdapter, list[RangePlan], TargetProfile]:  # fmt: skip
    """The adapter, per-range plans and target of an emitted build (for ``qexport verify``): the
    plan is a pure function of the statistics, the model, the manifest's recipe and its choices.
    model: which model to load for the manifest's model id (a folder only with consent) and the
    conditions it must take; load_adapter(stats, source, model id) gives the model (default:
    models.registry.load_model); folder: the build's folder, whose weights file the plans' integer
    weights then point into where it holds the same values; device: where the replay runs (as the
    build's --device).

    Raises:
        QexportError: statistics not found, of another model or another calibration; a manifest
            without a recipe; a model folder without consent; a condition the model does not take.
    """
    request = model or ModelRequest()
    path = Path(stats_path or manifest["calibration"].get("file", ""))
    if not path.is_file():
        raise QexportError(f"statistics {path} of this build are not found; pass --stats run.qstats")
    stats = load(path)
    check_calibration(stats, manifest, str(path))
    if "recipe" not in manifest or "choices" not in manifest:
        raise QexportError("this build's manifest.json has no recipe (an older qexport built it); rebuild it")
    recipe = Recipe.from_dict(manifest["recipe"])
    choices = [serial.from_dict(RangeChoices, c, path=f"choices[{i}]") for i, c in enumerate(manifest["choices"])]
    model_id = request.model_id(str(manifest["model_id"]), "the build's manifest.json", "built from it")
    if load_adapter is None:
        check_conditions(model_id, request.conditions)
        adapter = load_model(model_id)
        check_matches(stats, adapter.model_id, adapter.config_hash(), source=str(path))
    else:
        adapter = load_adapter(stats, str(path), model_id)  # it checks the conditions it can
    config, target = BuildConfig(recipe=recipe, device=device), get_profile(recipe.target)
    layer_bits = [dict.fromkeys(c.w_bits_raised, MIXED_HIGH_BITS) for c in choices]
    views: Views = {}
    ids = manifest.get("layer_ids", {})

    def sink(name: str, emitted: onnx.ModelProto, plan: RangePlan | None) -> None:
        if folder is not None and plan is not None:  # the plans point into the build's own weights
            point_into_file(plan, emitted_tensors(folder, name, views), ids, check=True)

    built, _ = plan_models(adapter, stats, config, target, alphas=[c.alpha for c in choices],
                           shrinks=[c.act_shrink for c in choices], sink=sink,
                           group_alphas=[c.group_alpha for c in choices] if recipe_alpha(recipe) == "layer" else None,
                           layer_bits=layer_bits if recipe.technique("mixed_precision") else None,
                           learned=[c.learned for c in choices] if recipe.technique("learned") else None)  # fmt: skip
    return adapter, [b.plan for b in built], target


def check_calibration(stats: QStats, manifest: dict[str, Any], source: str) -> None:
    """Refuse statistics other than those a build was made from: of another model (config hash),
    then of another calibration of it (prompts hash).

    Raises:
        QexportError: naming the statistics' model and the build's.
    """
    built = manifest["calibration"]
    if stats.header.get("config_hash") != built.get("config_hash"):
        raise QexportError(
            f"{source} was calibrated on another model: {stats.model_id!r} (config {stats.header.get('config_hash')}), "
            f"not this build's {manifest['model_id']!r} (config {built.get('config_hash')}); pass the .qstats it "
            "was built from with --stats"
        )
    if stats.header["prompts_hash"] != built["prompts_hash"]:
        raise QexportError(f"{source} is not the calibration this build used (prompts hash differs)")


def recipe_alpha(recipe: Recipe) -> object:
    """The recipe's smoothquant alpha (None without smoothing)."""
    smooth = recipe.technique("smoothquant")
    return getattr(smooth, "alpha", None)


def check_legality(models: list[tuple[str, onnx.ModelProto]], target: TargetProfile) -> list[LegalityReport]:
    """The target's legality report of every model.

    Raises:
        QexportError: a model breaks a rule of the target (names model, node, tensor and rule).
    """
    reports = [check_model(model, target, name) for name, model in models]
    for r in reports:
        if r.violations:
            more = f" (and {len(r.violations) - 1} more)" if len(r.violations) > 1 else ""
            raise QexportError(f"{r.model} is not legal on {target.name}: {r.violations[0]}{more}")
    return reports


def plan_models(
    adapter: ModelAdapter,
    stats: QStats,
    config: BuildConfig,
    target: TargetProfile,
    progress: Progress | None = None,
    alphas: list[float] | None = None,
    shrinks: list[float] | None = None,
    sink: Callable[[str, onnx.ModelProto, RangePlan | None], None] | None = None,
    group_alphas: list[dict[str, float]] | None = None,
    layer_bits: list[dict[str, int]] | None = None,
    learned: list[Learned] | None = None,
) -> tuple[list[BuiltRange], list[tuple[str, onnx.ModelProto]]]:
    """Export, plan and transform every range; returns the plans and the (file name, model) pairs.

    alphas / shrinks / group_alphas, if given, fix each range's alpha, activation shrink and
    per-group alphas (re-planning a build whose searches picked them); layer_bits fixes each
    range's per-layer weight bits (--mixed-precision), which are otherwise measured.
    sink, if given, receives each (file name, model, its plan; None for kv.onnx) as soon as it is
    built and the models are not kept (the returned list is then empty): memory stays at about one
    model.
    """
    built: list[BuiltRange] = []
    models: list[tuple[str, onnx.ModelProto]] = []
    ranges = split_ranges(stats.steps, config.ranges)
    report(progress, "building models", 0, len(ranges), "exporting the FP model and planning")
    replay = None
    start_replay: Callable[[], CalibrationReplay] | None = None
    q = config.quant
    shared_alpha_search = q.alpha_auto and alphas is None and q.smooth == Smooth.ASQ  # one alpha for all ranges
    layer_search = q.alpha_layer and group_alphas is None
    searches = (
        q.alpha_auto and alphas is None and not shared_alpha_search,
        q.act_observer == Observer.SEARCH and not shrinks,
    )
    mixed = bool(q.mixed_precision) and layer_bits is None
    learning = "learned" in q.techniques and learned is None  # a re-plan sets what the build learned
    if (
        any(searches)
        or shared_alpha_search
        or layer_search
        or mixed
        or planning_replays(q)
        or target.closed_linears
        or learning
    ):
        prompts = list(stats.header.get("prompt_texts", []))
        prompts = prompts[: replay_count(q.replay_prompts, len(prompts), "the statistics")]
        log.info("replaying %d calibration prompt(s) (searches, observers, rotations, attention, GPTQ)", len(prompts))
        # its own transformer on the device, copied before the export starts to trace the host's
        start_replay = partial(CalibrationReplay, on_device(adapter, config.device), prompts,
                               stats.header["timesteps"], stats.header["cfg"], config.device,
                               config.recipe.replay.scoring)  # fmt: skip
    with ThreadPoolExecutor(1, thread_name_prefix="replay") as background:
        # on a GPU the replay's sampling loop runs on that copy while the CPU exports the FP graph
        # from the host's transformer; joined (and its errors raised) before any use
        pending = None
        if start_replay is not None and overlapped(config.device):
            pending = background.submit(start_replay)
        elif start_replay is not None:
            replay = start_replay()
        with stage("FP export"):
            bindings, kept, graph_of, base = _range_graphs(adapter, stats, per_step=config.ranges is None)
        if pending is not None:
            with stage("FP replay"):  # the part of the replay the export did not cover
                replay = pending.result()
    # a GPU build's replay holds the transformer on the device: the host's copies of the weights it
    # quantizes go until the models are built (passes.fp_weights); planning reads the device's
    with _released_host_weights(adapter, base, bindings, replay, config):
        kept = kept if config.recipe.float_weights() == FloatWeights.INT8 else {}
        alpha_scores: dict[float, float] = {}
        allocations: list[Allocation] | None = None
        memo = Memo(config.device)  # GPTQ integers reused where weight and H repeat (shared weights); solves there
        if shared_alpha_search or layer_search or mixed:
            assert replay is not None
            with stage("FP export"):
                first = graph_of(ranges[0])
            if shared_alpha_search or layer_search:
                with stage("alpha search"):
                    alphas, group_alphas, alpha_scores = _choose_alphas(
                        first, bindings, adapter, stats, q, target, replay, ranges, progress, memo
                    )
            if mixed:
                with stage("mixed precision"):
                    allocations = _choose_mixed(first, bindings, adapter, stats, config, target, replay, ranges, alphas,
                                                group_alphas, progress, memo)  # fmt: skip
                layer_bits = [a.bits for a in allocations]
            del first
        kv, kv_model = None, None

        def emit(name: str, model: onnx.ModelProto, plan: RangePlan | None) -> None:
            if sink is not None:
                sink(name, model, plan)
            else:
                models.append((name, model))

        gc.collect()
        gc.freeze()  # what lives now lives through the build: the collections after each range skip it
        try:
            for index, steps in enumerate(ranges):
                with stage("FP export"):
                    graph, range_bindings = graph_of(steps), bindings
                if config.precompute_kv:
                    whole = FPExport(model=gs.export_onnx(graph), input_names=[t.name for t in graph.inputs],
                                     bindings=bindings)  # fmt: skip
                    parts = split_export(whole, adapter.model_id)
                    if kv is None:
                        kv, kv_model = _build_kv(parts, adapter, stats, config.quant, target, replay, kept)
                    graph, range_bindings = load_graph(parts.step), parts.step.bindings
                    graph.toposort()
                    del whole, parts
                quant = config.quant if alphas is None else replace(config.quant, alpha=alphas[index])
                quant = quant if not shrinks else replace(quant, act_shrink=shrinks[index])
                group_alpha = group_alphas[index] if group_alphas else None
                kv_plan = None if kv is None else kv.plan
                bits = layer_bits[index] if layer_bits else None
                start = None if not built else built[-1].plan.alpha  # the alpha search's start
                given = learned[index] if learned else None
                previous = built[-1].plan if built else None  # the learned quantizers' warm start
                following = ranges[index + 1] if index + 1 < len(ranges) else None
                ahead = _grams_ahead(replay, config.quant, following, stats.steps, config.device)
                plan, model, cost, turns = _build_range(graph, range_bindings, steps, adapter, stats, quant, target,
                                                        replay, searches, kv_plan, group_alpha, bits, memo,
                                                        kept, start, given, previous, ahead)  # fmt: skip
                del graph  # the model holds what emission needs: free the graph's arrays before the model is written
                gc.collect()
                heap.release()  # the graph's arrays, before the model is written
                share_arrays(plan, built[-1].plan if built else None)
                if alpha_scores:
                    plan.scores = {"alpha": alpha_scores, **plan.scores}
                name = f"step_{index:02d}.onnx" if config.ranges is None else f"range_{index:02d}.onnx"
                mixed_of = allocations[index] if allocations else None
                built.append(BuiltRange(index=index, steps=steps, model_file=name, plan=plan, lowrank=cost,
                                        rotation_macs=turns, kv=kv, mixed=mixed_of))  # fmt: skip
                integers = {layer: lp.w_q for layer, lp in plan.layers.items()}
                emit(name, model, plan)  # a sink that writes the model points the plan's integers into the file
                memo.follow({layer: (integers[layer], lp.w_q) for layer, lp in plan.layers.items()})
                del integers
                if kv_model is not None:  # after the first range's model: legality's first row stays a step model
                    emit(KV_FILE, kv_model, None)
                    kv_model = None
                del model
                gc.collect()
                heap.release()
                report(progress, "building models", index + 1, len(ranges), name)
        finally:
            gc.unfreeze()
    return built, models


def _choose_alphas(
    graph: gs.Graph,
    bindings: dict[str, LinearBinding],
    adapter: ModelAdapter,
    stats: QStats,
    quant: QuantConfig,
    target: TargetProfile,
    replay: CalibrationReplay,
    ranges: list[list[int]],
    progress: Progress | None,
    memo: Memo,
) -> tuple[list[float] | None, list[dict[str, float]] | None, dict[float, float]]:
    """The alphas chosen across ranges (exporter.alpha): per-range alphas and scores for ASQ with
    --alpha auto, per-group alphas for --alpha layer."""
    _, groups, weights, biases = range_inputs(graph, bindings, adapter)
    heads = head_dims(adapter, groups)
    cache: dict[tuple[int, ...], dict[str, np.ndarray] | None] = {}

    def make(steps: list[int], alpha: float, samples: dict[str, np.ndarray] | None) -> RangePlan:
        if samples is None and needs_samples(quant):
            key = tuple(steps)
            if key not in cache:
                cache[key] = _samples(replay, steps, groups, quant)
            samples = cache[key]
        config = replace(quant, alpha=alpha)
        return plan_range(steps, groups, stats.layers, weights, biases, config, target, keep_float=quant.alpha_layer,
                          samples=samples, head_dims=heads, grams=_grams(replay, quant, steps, groups, stats.steps),
                          gptq_memo=memo)  # fmt: skip

    if quant.alpha_layer:
        shared = quant.smooth == Smooth.ASQ
        return None, layer_alphas(replay, ranges, groups, make, shared, progress), {}
    alpha, scores = shared_alpha(replay, ranges, make)
    log.info("alpha %s for all ranges", alpha)
    return [alpha] * len(ranges), None, scores


def _choose_mixed(
    graph: gs.Graph,
    bindings: dict[str, LinearBinding],
    adapter: ModelAdapter,
    stats: QStats,
    config: BuildConfig,
    target: TargetProfile,
    replay: CalibrationReplay,
    ranges: list[list[int]],
    alphas: list[float] | None,
    group_alphas: list[dict[str, float]] | None,
    progress: Progress | None,
    memo: Memo,
) -> list[Allocation]:
    """Per-range weight widths of --mixed-precision (exporter.mixed), measured with each range's
    alpha; one allocation for all ranges unless TSQ gives each range its own weights (time ranges)."""
    q = config.quant
    _, groups, weights, biases = range_inputs(graph, bindings, adapter)
    heads = head_dims(adapter, groups)
    cache: dict[int, dict[str, np.ndarray] | None] = {}

    def make(index: int, bits: dict[str, int] | None) -> RangePlan:
        if index not in cache:
            cache[index] = _samples(replay, ranges[index], groups, q) if needs_samples(q) else None
        quant = q if alphas is None else replace(q, alpha=alphas[index])
        group_alpha = group_alphas[index] if group_alphas else None
        grams = _grams(replay, quant, ranges[index], groups, stats.steps)
        return plan_range(ranges[index], groups, stats.layers, weights, biases, quant, target, samples=cache[index],
                          head_dims=heads, group_alpha=group_alpha, layer_bits=bits, grams=grams,
                          gptq_memo=memo)  # fmt: skip

    params = {layer: weights.size(layer) for layer in weights}  # not read back where a GPU holds them
    shared = config.ranges is None or q.smooth != Smooth.TSQ
    return choose_bits(replay, ranges, shared, make, params, q.w_bits, q.mixed_precision, target, progress)


def _samples(
    replay: CalibrationReplay, steps: list[int], groups: list[Group], quant: QuantConfig
) -> dict[str, np.ndarray]:
    """Replayed inputs of the groups whose planning reads samples (observers, rotated inputs)."""
    sampled = [g for g in groups if any(t.wants_samples(quant, g.fold) for t in ORDER)]
    return replay.layer_inputs(steps, [g.layers[0] for g in sampled])


def _build_kv(
    parts: KVExport,
    adapter: ModelAdapter,
    stats: QStats,
    quant: QuantConfig,
    target: TargetProfile,
    replay: CalibrationReplay | None,
    kept: dict[str, KeptBinding] | None = None,
) -> tuple[BuiltKV, onnx.ModelProto]:
    """Plan and transform kv.onnx once, over all calibrated steps (see exporter.kv.kv_quant)."""
    fp = parts.kv
    graph = load_graph(fp)
    graph.toposort()
    steps = list(range(stats.steps))
    plan, model, cost, _ = _build_range(graph, fp.bindings, steps, adapter, stats, kv_quant(quant), target, replay,
                                        kept=kept)  # fmt: skip
    inputs, outputs = io_specs(fp.model.graph.input), io_specs(fp.model.graph.output)
    return BuiltKV(model_file=KV_FILE, plan=plan, inputs=inputs, outputs=outputs, cost=parts.cost, lowrank=cost), model


def _range_graphs(
    adapter: ModelAdapter, stats: QStats, per_step: bool
) -> tuple[dict[str, LinearBinding], dict[str, KeptBinding], Callable[[list[int]], gs.Graph], gs.Graph]:
    """One FP export with the timestep an input, folded once; returns its bindings (calibrated
    linears, float-kept layers), a function giving a range's graph, a copy that shares the folded
    graph's weights (per step: the timestep of the range's step fixed), and that folded graph."""
    exported = prepare_graph(export_graph(adapter, list(stats.layers)))
    bindings, kept, base = exported.bindings, exported.kept, exported.graph
    if not per_step:
        base.toposort()
        return bindings, kept, lambda steps: copy_graph(base), base
    timesteps = stats.header["timesteps"]
    step_graphs = StepGraphs(base, adapter.step_input(timesteps[0])[0])
    return bindings, kept, lambda steps: step_graphs.at(adapter.step_input(timesteps[steps[0]])[1]), base


SHARED_FIELDS = ("w_q", "w_scale", "w_zero", "lowrank_a", "lowrank_b")


@contextmanager
def _released_host_weights(
    adapter: ModelAdapter,
    base: gs.Graph,
    bindings: dict[str, LinearBinding],
    replay: CalibrationReplay | None,
    config: BuildConfig,
) -> Iterator[None]:
    """The host copies of the quantized linears' FP weights released for the block and made
    again after it, where the replay has its own transformer on a device and nothing exports the
    whole FP graph again (precomputed KV splits it): passes.fp_weights."""
    if replay is None or replay.adapter is adapter or config.precompute_kv:
        yield
        return
    device = replay.adapter.transformer
    emptied = release(base.tensors(), {layer: b.weight for layer, b in bindings.items()}, adapter.transformer, device)
    log.info("%d quantized linears' FP weights read from %s while planning (host copies released)", len(emptied),
             config.device)  # fmt: skip
    try:
        yield
    finally:
        restore(emptied, device)


def share_arrays(plan: RangePlan, previous: RangePlan | None) -> None:
    """Point each layer's weight arrays at the previous range's where they are equal (per-step
    models without TSQ plan the same integer weights every step), so the plans a build keeps for
    verification hold one copy of them, not one per step."""
    if previous is None:
        return
    for layer, lp in plan.layers.items():
        old = previous.layers.get(layer)
        for name in SHARED_FIELDS if old is not None else ():
            a, b = getattr(lp, name), getattr(old, name)
            if a is not None and b is not None and _equal(a, b):
                setattr(lp, name, b)


def _equal(a: np.ndarray, b: np.ndarray) -> bool:
    """a == b, deciding on a first slice where they differ there (TSQ's per-step weights): the
    earlier array may be a view of the weights file, whose pages a full comparison would map in."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    head = min(a.size, 4096)
    return bool(np.array_equal(a.reshape(-1)[:head], b.reshape(-1)[:head]) and np.array_equal(a, b))


def _grams(
    replay: CalibrationReplay | None, quant: QuantConfig, steps: list[int], groups: list[Group], total: int
) -> Mapping[str, Gram] | None:
    """The input Gram matrices GPTQ needs (None without it): over the steps that share the range's s
    with TSQ (its own, or its --smooth-ranges range), else over every calibrated step, so that
    weights shared between ranges stay shared."""
    if not gptq(quant):
        return None
    assert replay is not None
    return replay.input_grams(_gram_steps(quant, steps, total), [g.layers[0] for g in groups])


def _gram_steps(quant: QuantConfig, steps: list[int], total: int) -> list[int]:
    """The steps whose layer inputs make a range's Gram matrices (see _grams)."""
    return smoothing_steps(steps, total, quant.smooth_ranges) if quant.smooth == Smooth.TSQ else list(range(total))


def _grams_ahead(
    replay: CalibrationReplay | None, quant: QuantConfig, steps: list[int] | None, total: int, device: str
) -> Callable[[list[Group]], None] | None:
    """What starts the next range's Gram matrices (its `steps`) once a range's plan is final, so that
    a GPU build's device makes them while the CPU runs the passes and writes the model; None where
    there is no next range, no GPTQ, or the replay runs on the CPU (whose cores do that work)."""
    if replay is None or steps is None or not gptq(quant) or not overlapped(device):
        return None
    return lambda groups: replay.grams_ahead(_gram_steps(quant, steps, total), [g.layers[0] for g in groups])


def _build_range(
    graph: gs.Graph,
    bindings: dict[str, LinearBinding],
    steps: list[int],
    adapter: ModelAdapter,
    stats: QStats,
    quant: QuantConfig,
    target: TargetProfile,
    replay: CalibrationReplay | None = None,
    searches: tuple[bool, bool] = (False, False),
    kv: RangePlan | None = None,
    group_alpha: dict[str, float] | None = None,
    layer_bits: dict[str, int] | None = None,
    gptq_memo: Memo | None = None,
    kept: dict[str, KeptBinding] | None = None,
    start: float | None = None,
    learned: Learned | None = None,
    previous: RangePlan | None = None,
    ahead: Callable[[list[Group]], None] | None = None,
) -> tuple[RangePlan, onnx.ModelProto, BranchCost, int]:
    """One range's plan and emitted model; the alpha search climbs from `start` (the previous
    range's alpha) where given, the activation range search goes coarse to fine (exporter.search);
    `learned`: the input quantizers a build trained (a re-plan's), set instead of training;
    `previous`: the range before's plan (the learned quantizers' warm start); `ahead`: called with
    the groups once the plan is final, before the passes (the next range's replay work starts)."""
    nodes, groups, weights, biases = range_inputs(graph, bindings, adapter)
    weight_only = tuple(surviving(graph, kept)) if kept else ()
    samples = None
    if needs_samples(quant):
        assert replay is not None
        samples = _samples(replay, steps, groups, quant)
    heads = head_dims(adapter, groups)
    sites = find_attention(graph, attention_scopes(adapter.transformer)) if quant.quantize_attention else {}
    grams = _grams(replay, quant, steps, groups, stats.steps)

    def make(
        alpha: float, shrink: float, rounding: Rounding = quant.weight_rounding, base: RangePlan | None = None
    ) -> RangePlan:
        """The plan at (alpha, shrink); from `base` (the same settings, another shrink) without planning
        its weights again where given."""
        if base is not None:
            plan = with_shrink(base, shrink, target, skip=kv.layers if kv is not None else ())
        else:
            config = replace(quant, alpha=alpha, act_shrink=shrink, weight_rounding=rounding)
            plan = plan_range(steps, groups, stats.layers, weights, biases, config, target, samples=samples,
                              head_dims=heads, group_alpha=group_alpha, layer_bits=layer_bits, grams=grams,
                              gptq_memo=gptq_memo)  # fmt: skip
            plan.weight_only = weight_only  # before any replay: the simulation rounds these weights too
        if sites:  # Q/K/V ranges as the emitted attention reads them: measured under this plan's linears
            assert replay is not None
            ranges = replay.attention_ranges(plan, list(sites))
            grid = next(iter(plan.layers.values())).a_grid
            plan.attention = plan_attention(ranges, grid, target.pow2_scales, shrink)
        return plan

    alpha, shrink = quant.alpha, quant.act_shrink
    scores = {}
    found: RangePlan | None = None  # the last search's choice: made with (alpha, shrink), kv merged in
    if searches[0] and quant.smooth != Smooth.NONE:
        assert replay is not None
        # with GPTQ, alpha's candidates are scored with nearest rounding and GPTQ runs for the chosen one
        # only: one solve per layer instead of one per candidate (docs/techniques/gptq.md), unless the
        # recipe scores them as they will be rounded (gptq.alpha_scoring gptq)
        rounding = Rounding.NEAREST if gptq(quant) and quant.alpha_scoring == "nearest" else quant.weight_rounding
        # on a GPU the next candidate is planned on the CPU while the device scores one; not where a plan
        # replays attention ranges (the scoring holds the transformer), nor on the CPU (its cores score)
        planned_ahead = overlapped(str(replay.device)) and not sites
        with stage("alpha search"):
            # a candidate rounded otherwise is planned again: the search holds no plan beside the one it scores
            alpha, found, scores["alpha"] = best(replay, ALPHAS, lambda a: with_kv(make(a, shrink, rounding), kv),
                                                 start=start, keep=rounding == quant.weight_rounding,
                                                 ahead=planned_ahead)  # fmt: skip
    if searches[1]:
        assert replay is not None
        known = None if found is None else (shrink, scores["alpha"][alpha], found)  # the alpha search ran it
        with stage("observer search"):
            # the ratios share one plan's weights (with GPTQ, one solve per layer for all of them)
            base = found if found is not None else make(alpha, shrink)
            shrunk = partial(make, alpha, base=base)
            shrink, found, scores["act_shrink"] = best(replay, SHRINKS, lambda r: with_kv(shrunk(r), kv), known)
    with stage("plan"):
        plan = found if found is not None and kv is None else make(alpha, shrink)
    plan.scores = scores
    plan = _learned(plan, quant, target, replay, learned, previous)
    if target.closed_linears:  # output quantizers from the replay, the plan's linears simulated
        assert replay is not None
        plan_outputs(plan, replay.output_ranges(with_kv(plan, kv)), target)
    if ahead is not None:
        ahead(groups)
    cost = lowrank_cost(graph, nodes, plan)
    turns = rotation_macs(graph, nodes, groups, plan)
    passes = PassConfig(plan=plan, groups=groups, nodes=nodes, attention=sites, kept=kept or {})
    with stage("passes"):
        graph = run_passes(graph, passes, target)
        if target.integer_activations:
            assert replay is not None
            graph = _integer_only(graph, steps, target, replay)
        model = pack_low_bit(gs.export_onnx(graph), plan)
    stamp(model)
    return with_kv(plan, kv), model, cost, turns


def _learned(
    plan: RangePlan,
    quant: QuantConfig,
    target: TargetProfile,
    replay: CalibrationReplay | None,
    given: Learned | None,
    previous: RangePlan | None = None,
) -> RangePlan:
    """The plan with its blocks' input quantizers trained (technique 'learned'), or set from `given`;
    with warm_iterations, started from `previous` (the range before) where there is one."""
    chosen = quant.techniques.get("learned")
    if not isinstance(chosen, LearnedQuantizers):
        return plan
    if given is None:
        assert replay is not None
        start, iterations = None, chosen.iterations
        if chosen.warm_iterations is not None and previous is not None:
            start, iterations = warm_start(previous), chosen.warm_iterations
        with stage("learn"):
            given, errors = learn(replay, plan, chosen.rows, iterations, chosen.lr, chosen.seed, start)
        log.info("learned the input quantizers of %d linears in %d blocks: block output MSE %s", len(given),
                 len(errors), ", ".join(f"{b:.3g}->{a:.3g}" for b, a in errors.values()))  # fmt: skip
        plan.parts["learned_mse"] = errors
    return with_learned(plan, given, target)


def _integer_only(graph: gs.Graph, steps: list[int], target: TargetProfile, replay: CalibrationReplay) -> gs.Graph:
    """Every float activation of the emitted graph quantized (passes.integer_only), with the ranges
    the graph itself takes on onnxruntime CPU over the replayed inputs of the range's steps."""
    model = infer_shapes(gs.export_onnx(graph))  # dtypes of every tensor (a weightless skeleton inferred)
    graph = gs.import_onnx(model)
    ranges = tensor_ranges(model, replay.step_feeds(steps), observed_tensors(graph))
    return integer_only(graph, ranges, target)


def rotation_macs(graph: gs.Graph, nodes: dict[str, str], groups: list[Group], plan: RangePlan) -> int:
    """MACs one model call spends in online rotations: rows x channels x block per rotated group
    (twice that for DuQuant's two block rotations)."""
    total = 0
    for g in groups:
        rot = plan.online.get(g.tensor)
        shape = node_named(graph, nodes[g.layers[0]]).inputs[0].shape or []
        if rot is not None and shape and all(isinstance(d, int) for d in shape):
            factors = plan.online_factors.get(g.tensor)  # DuQuant's: two block MatMuls
            per_channel = 2 * len(factors[0]) if factors is not None else int(np.count_nonzero(rot[0]))
            total += int(np.prod(shape[:-1])) * rot.shape[0] * per_channel
    return total


def lowrank_cost(graph: gs.Graph, nodes: dict[str, str], plan: RangePlan) -> BranchCost:
    """MACs and bytes the low-rank branches add to one model call (rows from the inferred shapes)."""
    total = BranchCost(macs=0, linear_macs=0, bytes=0)
    for layer, lp in plan.layers.items():
        shape = node_named(graph, nodes[layer]).inputs[0].shape or []
        rows = int(np.prod(shape[:-1])) if shape and all(isinstance(d, int) for d in shape) else 0
        n_in, n_out = lp.shape
        total = total + branch_cost(rows, lp.lowrank_a, lp.lowrank_b, out_features=n_out, in_features=n_in)
    return total


def range_inputs(
    graph: gs.Graph, bindings: dict[str, LinearBinding], adapter: ModelAdapter
) -> tuple[dict[str, str], list[Group], FPWeights, dict[str, np.ndarray | None]]:
    """What planning a range reads off a prepared FP graph: each layer's MatMul node, the
    input-sharing groups with their folds, FP weights (W^T; read from the device where a GPU build
    released the host's: passes.fp_weights) and biases."""
    nodes = {layer: b.node for layer, b in bindings.items()}
    names = adapter.family.attention
    values = {layer: v for layer in nodes if (v := names.value_of(layer)) is not None}
    groups = find_groups(graph, nodes, {layer: b.in_features for layer, b in bindings.items()}, values)
    constants = graph.tensors()
    weights = graph_weights(constants, {layer: b.weight for layer, b in bindings.items()})
    modules = dict(adapter.transformer.named_modules())
    biases = {layer: _bias(modules[layer]) for layer in bindings}
    return nodes, groups, weights, biases


def head_dims(adapter: ModelAdapter, groups: list[Group]) -> dict[str, int]:
    """Attention-output layer -> head size of its attention (the parent module's ``heads``)."""
    modules = dict(adapter.transformer.named_modules())
    out = {}
    for g in groups:
        if g.fold == "value":
            block = adapter.family.attention.block_of(g.layers[0])
            parent = modules.get(block) if block is not None else None
            heads = getattr(parent, "heads", None)
            if isinstance(heads, int) and heads > 0:
                out[g.layers[0]] = g.channels // heads
    return out


def _bias(module: object) -> np.ndarray | None:
    bias = getattr(module, "bias", None)
    return None if bias is None else bias.detach().float().numpy()
