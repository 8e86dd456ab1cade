"""``build``: from a .qstats file, export the model per range, run the passes, and emit one QDQ
ONNX per range (per step for TSW) with shared weights and manifest.json; the output folder
appears only when everything is written (temp folder, then rename)."""

from __future__ import annotations

import gc
import json
import logging
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from qexport.calib.store import QStats, check_matches, load
from qexport.exporter.conditioning import export_conditioning
from qexport.exporter.emit import EmitSummary, ModelWriter, layer_ids
from qexport.exporter.fp_export import LinearBinding, StepGraphs, export_fp, load_graph, prepare, stamp
from qexport.exporter.manifest import make_manifest, write_manifest
from qexport.exporter.replay import CalibrationReplay
from qexport.exporter.search import ALPHAS, SHRINKS, best
from qexport.passes.analyze import Group, find_groups
from qexport.passes.apply import PassConfig, pack_low_bit, run_passes
from qexport.passes.graph import node_named
from qexport.passes.lowrank import BranchCost, branch_cost
from qexport.passes.observe import Observer
from qexport.passes.plan import QuantConfig, RangePlan, Smooth, plan_range
from qexport.passes.specialise import copy_graph
from qexport.targets.legality import LegalityReport, check_model
from qexport.targets.profile import TargetProfile, get_profile

from qexport.errors import QexportError
from qexport.models.adapter import ModelAdapter
from qexport.models.registry import load_model

log = logging.getLogger(__name__)
LEGALITY_FILE = "legality.json"


@dataclass(frozen=True, kw_only=True)
class BuildConfig:
    """What to emit: bits/smoothing, granularity (None = one model per step), target."""

    quant: QuantConfig = field(default_factory=QuantConfig)
    ranges: int | None = None
    target: str = "ort-cpu"
    force: bool = False


@dataclass(kw_only=True)
class BuiltRange:
    index: int
    steps: list[int]
    model_file: str
    plan: RangePlan
    lowrank: BranchCost = field(default_factory=lambda: BranchCost(macs=0, linear_macs=0, bytes=0))


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
        raise QexportError(f"--time-ranges must be in 1..{steps} (the calibrated steps), got {ranges}")
    return [[int(i) for i in chunk] for chunk in np.array_split(np.arange(steps), ranges)]


def needs_replay(quant: QuantConfig) -> bool:
    """Whether the build replays calibration prompts (alpha or shrink search, sample-based observers,
    rotations)."""
    return quant.alpha_auto or quant.act_observer == Observer.SEARCH or needs_samples(quant)


def needs_samples(quant: QuantConfig) -> bool:
    """Whether planning needs replayed layer inputs (sample-based observers; rotated input ranges)."""
    return quant.act_observer.samples or quant.rotate


def check_request(config: BuildConfig, out: Path) -> TargetProfile:
    """Everything that can be refused before loading weights."""
    target = get_profile(config.target)
    target.weight_type(config.quant.w_bits)
    target.activation_type(config.quant.a_bits)
    if out.exists() and not config.force:
        raise QexportError(f"output folder {out} exists; pass --force to replace it")
    return target


def build(
    stats_path: Path, out: Path, config: BuildConfig, progress: Callable[[str], None] | None = None
) -> BuildResult:
    """Build the emitted models.

    Raises:
        QexportError: bad request, statistics from another model, an unmappable layer.
    """
    start = time.perf_counter()
    target = check_request(config, out)
    stats = load(stats_path)
    split_ranges(stats.steps, config.ranges)  # refuse a bad --time-ranges before loading weights
    if needs_replay(config.quant) and not stats.header.get("prompt_texts"):
        raise QexportError(
            f"{stats_path} does not record its prompts, which --alpha auto, --rotate and the percentile / mse / search "
            "activation observers replay; recalibrate it with this qexport"
        )
    adapter = load_model(stats.model_id)
    check_matches(stats, adapter.model_id, adapter.config_hash(), source=str(stats_path))
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.building-"))
    try:
        ids = layer_ids(list(stats.layers))
        writer = ModelWriter(tmp, ids)
        legality: list[LegalityReport] = []

        def sink(name: str, model: onnx.ModelProto) -> None:
            # legality before emission renames nodes and tensors; each model is then written at
            # once, so a full-size build never holds them all
            legality.extend(check_legality([(name, model)], target))
            writer.add(name, model)

        try:
            built, _ = plan_models(adapter, stats, config, target, progress, sink=sink)
        finally:
            emit = writer.close()
        (tmp / LEGALITY_FILE).write_text(json.dumps([r.to_json() for r in legality], indent=1))
        manifest = make_manifest(adapter, stats, config, target, built, emit)
        manifest["legality"] = {"file": LEGALITY_FILE, "models": [r.to_json(nodes=False) for r in legality]}
        manifest["conditioning"] = export_conditioning(adapter, tmp)
        manifest["calibration"]["file"] = str(Path(stats_path).resolve())
        manifest["layer_ids"] = ids
        write_manifest(tmp, manifest)
        tmp.chmod(0o755)
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
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
    progress: Callable[[str], None] | None = None,
    alphas: list[float] | None = None,
    shrinks: list[float] | None = None,
    sink: Callable[[str, onnx.ModelProto], None] | None = None,
) -> tuple[list[BuiltRange], list[tuple[str, onnx.ModelProto]]]:
    """Export, plan and transform every range; returns the plans and the (file name, model) pairs.

    alphas / shrinks, if given, fix each range's alpha and activation shrink (re-planning a build
    whose searches picked them).
    sink, if given, receives each (file name, model) as soon as it is built and the models are
    not kept (the returned list is then empty): memory stays at about one model.
    """
    built: list[BuiltRange] = []
    models: list[tuple[str, onnx.ModelProto]] = []
    ranges = split_ranges(stats.steps, config.ranges)
    replay = None
    q = config.quant
    searches = (q.alpha_auto and alphas is None, q.act_observer == Observer.SEARCH and not shrinks)
    if any(searches) or needs_samples(q):
        log.info("replaying calibration prompts (searches, sample-based observers, rotations)")
        prompts = list(stats.header.get("prompt_texts", []))
        replay = CalibrationReplay(adapter, prompts, stats.header["timesteps"], stats.header["cfg"])
    bindings, graph_of = _range_graphs(adapter, stats, per_step=config.ranges is None)
    gc.collect()
    gc.freeze()  # what lives now lives through the build: the collections after each range skip it
    try:
        for index, steps in enumerate(ranges):
            graph = graph_of(steps)
            quant = config.quant if alphas is None else replace(config.quant, alpha=alphas[index])
            quant = quant if not shrinks else replace(quant, act_shrink=shrinks[index])
            plan, model, cost = _build_range(graph, bindings, steps, adapter, stats, quant, target, replay, searches)
            share_arrays(plan, built[-1].plan if built else None)
            name = f"step_{index:02d}.onnx" if config.ranges is None else f"range_{index:02d}.onnx"
            built.append(BuiltRange(index=index, steps=steps, model_file=name, plan=plan, lowrank=cost))
            if sink is not None:
                sink(name, model)
            else:
                models.append((name, model))
            del graph, model
            gc.collect()  # a graph is cycles of gs tensors and nodes: free its arrays now, not generations later
            if progress is not None:
                progress(name)
    finally:
        gc.unfreeze()
    return built, models


def _range_graphs(
    adapter: ModelAdapter, stats: QStats, per_step: bool
) -> tuple[dict[str, LinearBinding], Callable[[list[int]], gs.Graph]]:
    """One FP export with the timestep an input, folded once; returns its bindings and a function
    giving a range's graph, a copy that shares the folded graph's weights (per step: the timestep
    of the range's step fixed)."""
    exported = prepare(export_fp(adapter, list(stats.layers)))
    bindings, base = exported.bindings, load_graph(exported)
    del exported
    if not per_step:
        base.toposort()
        return bindings, lambda steps: copy_graph(base)
    step_graphs = StepGraphs(base)
    return bindings, lambda steps: step_graphs.at(stats.header["timesteps"][steps[0]])


SHARED_FIELDS = ("w_q", "w_scale", "w_zero", "lowrank_a", "lowrank_b")


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
            if a is not None and b is not None and a.dtype == b.dtype and np.array_equal(a, b):
                setattr(lp, name, b)


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
) -> tuple[RangePlan, onnx.ModelProto, BranchCost]:
    nodes, groups, weights, biases = range_inputs(graph, bindings, adapter)
    samples = None
    if needs_samples(quant):
        assert replay is not None
        observed = quant.act_observer.samples
        sampled = groups if observed else [g for g in groups if g.fold == "value"]
        samples = replay.layer_inputs(steps, [g.layers[0] for g in sampled])
    heads = head_dims(adapter, groups)

    def make(alpha: float, shrink: float) -> RangePlan:
        config = replace(quant, alpha=alpha, act_shrink=shrink)
        return plan_range(
            steps, groups, stats.layers, weights, biases, config, target, samples=samples, head_dims=heads
        )

    alpha, shrink = quant.alpha, quant.act_shrink
    scores = {}
    if searches[0] and quant.smooth != Smooth.NONE:
        assert replay is not None
        alpha, _, scores["alpha"] = best(replay, ALPHAS, lambda a: make(a, shrink))
    if searches[1]:
        assert replay is not None
        shrink, _, scores["act_shrink"] = best(replay, SHRINKS, lambda r: make(alpha, r))
    plan = make(alpha, shrink)
    plan.scores = scores
    cost = lowrank_cost(graph, nodes, plan)
    graph = run_passes(graph, PassConfig(plan=plan, groups=groups, nodes=nodes), target)
    model = pack_low_bit(gs.export_onnx(graph), plan)
    stamp(model)
    return plan, model, cost


def lowrank_cost(graph: gs.Graph, nodes: dict[str, str], plan: RangePlan) -> BranchCost:
    """MACs and bytes the low-rank branches add to one model call (rows from the inferred shapes)."""
    total = BranchCost(macs=0, linear_macs=0, bytes=0)
    for layer, lp in plan.layers.items():
        shape = node_named(graph, nodes[layer]).inputs[0].shape or []
        rows = int(np.prod(shape[:-1])) if shape and all(isinstance(d, int) for d in shape) else 0
        n_in, n_out = lp.w_q.shape
        total = total + branch_cost(rows, lp.lowrank_a, lp.lowrank_b, out_features=n_out, in_features=n_in)
    return total


def range_inputs(
    graph: gs.Graph, bindings: dict[str, LinearBinding], adapter: ModelAdapter
) -> tuple[dict[str, str], list[Group], dict[str, np.ndarray], dict[str, np.ndarray | None]]:
    """What planning a range reads off a prepared FP graph: each layer's MatMul node, the
    input-sharing groups with their folds, FP weights (W^T) and biases."""
    nodes = {layer: b.node for layer, b in bindings.items()}
    groups = find_groups(graph, nodes, {layer: b.in_features for layer, b in bindings.items()})
    constants = graph.tensors()
    weights = {layer: np.asarray(constants[b.weight].values) for layer, b in bindings.items()}
    modules = dict(adapter.transformer.named_modules())
    biases = {layer: _bias(modules[layer]) for layer in bindings}
    return nodes, groups, weights, biases


def head_dims(adapter: ModelAdapter, groups: list[Group]) -> dict[str, int]:
    """Attention-output layer -> head size of its attention (the parent module's ``heads``)."""
    modules = dict(adapter.transformer.named_modules())
    out = {}
    for g in groups:
        if g.fold == "value":
            parent = modules.get(g.layers[0].removesuffix(".to_out.0"))
            heads = getattr(parent, "heads", None)
            if isinstance(heads, int) and heads > 0:
                out[g.layers[0]] = g.channels // heads
    return out


def _bias(module: object) -> np.ndarray | None:
    bias = getattr(module, "bias", None)
    return None if bias is None else bias.detach().float().numpy()
