"""``build`` of a real pipeline's statistics (calib.pipeline): the pipeline is traced again with
the calibration's arguments and bound for the edge (exporter.pipeline_parts), its transformer with
those bound inputs goes through the same planning and passes as a built-in (one QDQ model per
step or per range, weights stored once), and the text parts, VAE decoder and scheduler block are
shipped beside them. The folder appears whole or not at all."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from qexport.calib.store import QStats, check_matches, load
from qexport.exporter.build import check_request, check_widths, choices_of, emit_models, legality_record, replan
from qexport.exporter.built import BuildConfig, BuiltRange
from qexport.exporter.denoiser_export import BoundTransformer
from qexport.exporter.emit import layer_ids
from qexport.exporter.manifest import (
    files_record,
    identity_record,
    quantization_record,
    ranges_record,
    target_record,
    write_manifest,
)
from qexport.exporter.pipeline_parts import Binding, bind_pipeline, release_parts, write_parts
from qexport.passes.plan import RangePlan
from qexport.targets.legality import LegalityReport
from qexport.targets.profile import TargetProfile
from torch import nn

from qexport import serial
from qexport.errors import QexportError
from qexport.media import written_whole
from qexport.models.adapter import ModelAdapter, config_hash
from qexport.models.builtin_pipeline import CLASS_NAMES as QEXPORT_PIPELINES
from qexport.models.families import Family, family_for
from qexport.models.pipeline import check_condition
from qexport.models.registry import ModelRequest
from qexport.progress import Progress, report
from qexport.stages import stage


class TextPartsOnly:
    """The conditioner of a pipeline adapter: its prompts go through the pipeline's text parts at
    the edge, never through a qexport conditioner (sampling, replay and the built-in verification
    are not this build's path)."""

    kind = "caption"
    synthetic = False

    def encode(self, prompts: list[str]) -> torch.Tensor:
        raise QexportError("a pipeline build encodes prompts with its text parts (qexport run); not supported here")

    def null(self, n: int) -> torch.Tensor:
        return self.encode([""] * n)


@dataclass(kw_only=True)
class PipelineAdapter(ModelAdapter):
    """A pipeline's transformer as the build sees it: exported with the inputs bound from the
    pipeline's own call, its timestep the bound timestep input times its factor."""

    binding: Binding
    call: dict[str, Any] = field(default_factory=dict)  # the calibration's pipeline arguments

    @property
    def family(self) -> Family:
        """The registry entry of the transformer, or the generic one (models.families.family_for)."""
        return family_for(self.transformer)

    def denoiser(self) -> BoundTransformer:  # type: ignore[override]
        return BoundTransformer(self.transformer, self.binding.first, self.binding.calls[0]["inputs"]).eval()

    def export_inputs(self) -> tuple[nn.Module, tuple[torch.Tensor, ...], list[str]]:
        model = BoundTransformer(self.transformer, self.binding.first, self.binding.calls[0]["inputs"]).eval()
        first = self.binding.first
        return model, tuple(torch.from_numpy(first.kept[n]) for n in model.names), list(model.names)

    def step_input(self, timestep: float) -> tuple[str, float]:
        spec = timestep_input(self.binding)
        return spec["name"], float(timestep) * spec["factor"]

    def check_conditions(self, texts: tuple[str, ...]) -> None:
        """Refuse a prompt (or class label) the pipeline does not take, as its tokenizers see it."""
        for text in texts:
            check_condition(self.binding.pipe, text, self.call)


def timestep_input(binding: Binding) -> dict[str, Any]:
    """The bound timestep input (the one a per-step model fixes).

    Raises:
        QexportError: the transformer is not fed the scheduler's timestep.
    """
    spec = next((i for i in binding.calls[0]["inputs"] if i["source"] == "timestep"), None)
    if spec is None:
        raise QexportError(f"{binding.trace.pipeline}'s transformer is not fed the timestep; no per-step model")
    return spec


def check_pipeline_stats(stats: QStats, source: str) -> dict[str, Any]:
    """The pipeline arguments of a pipeline calibration that this path builds; checked before any
    pipeline is loaded.

    Raises:
        QexportError: statistics not from a pipeline, or a qexport model's pipeline (its build is
            the built-in one).
    """
    header = stats.header
    if "pipeline" not in header:
        raise QexportError(f"{source} is not a pipeline calibration")
    call = header.get("call", {})  # a mapping: the .qstats schema checked it at load
    if header["pipeline"] in QEXPORT_PIPELINES:  # its sampling loop is the built-in one: so is its build
        raise QexportError(
            f"{source} calibrated a qexport model ({header['pipeline']}), whose build is the built-in one; "
            f"calibrate it with --model {header['model_id']} (or its built-in name) and build that"
        )
    return call


def pipeline_adapter(stats: QStats, source: str, model_id: str, device: str = "cpu") -> PipelineAdapter:
    """Load and bind the pipeline of `model_id` (``diffusers:FOLDER``: the folder the statistics name,
    or the user's own copy of it) with the calibration's own arguments, and check it is the same
    transformer and the same scheduler steps.

    Raises:
        QexportError: as check_pipeline_stats; a folder that moved or changed.
    """
    header = stats.header
    call = check_pipeline_stats(stats, source)
    folder = Path(model_id.removeprefix("diffusers:"))
    binding = bind_pipeline(folder, header["prompt_texts"][0], int(header["steps"]), call, device)
    transformer = binding.pipe.transformer.float().eval()
    name = type(transformer).__name__
    adapter = PipelineAdapter(
        model_id=model_id,
        class_name=name,
        transformer=transformer,
        conditioner=TextPartsOnly(),
        latent_shape=tuple(binding.trace.samples[0].shape[1:]),
        description=f"{binding.trace.pipeline} from {folder}",
        binding=binding,
        call=call,
    )
    check_matches(stats, adapter.model_id, config_hash(name, dict(transformer.config)), source=source)
    traced = [s["timestep"] for s in binding.block["steps"]]
    if not np.allclose(traced, header["timesteps"], rtol=1e-6, atol=1e-6):
        raise QexportError(f"{folder}'s scheduler now gives timesteps other than those {source} was calibrated at")
    return adapter


@dataclass(kw_only=True)
class PipelineBuild:
    folder: Path
    adapter: PipelineAdapter
    stats: QStats
    ranges: list[BuiltRange]
    manifest: dict[str, Any]
    seconds: float
    legality: list[LegalityReport]


def build_pipeline(
    stats_path: Path, out: Path, config: BuildConfig, progress: Progress | None = None, device: str = "cpu",
    model: ModelRequest | None = None,
) -> PipelineBuild:  # fmt: skip
    """Build the quantized edge folder of a pipeline calibration (the pipeline traced on `device`;
    export and passes on the CPU). model: which pipeline folder to load (the one the statistics name
    only with consent, see ModelRequest) and the conditions it must take.

    Raises:
        QexportError: a bad request, a recipe this path does not take yet (prompt replay, K/V
            precompute), a folder without consent, statistics from another model, a condition the
            pipeline does not take, an unbindable pipeline.
    """
    request = model or ModelRequest()
    start = time.perf_counter()
    target = check_request(config, out)
    if target.closed_linears:
        raise QexportError(
            f"target {target.name} closes every quantized linear with output ranges from a replay of the prompts, "
            "which pipeline builds do not have yet; choose another target"
        )
    unsupported = [*config.recipe.replaying(), *(["precompute_kv"] if config.precompute_kv else [])]
    if unsupported:
        raise QexportError(
            f"recipe technique {unsupported[0]!r} is not available for pipeline builds yet (it replays prompts "
            "through qexport's own sampler); choose a recipe without it"
        )
    stats = load(stats_path)
    check_pipeline_stats(stats, str(stats_path))
    check_widths(config.quant, stats)
    model_id = request.model_id(stats.model_id, str(stats_path), "calibrated there")
    report(progress, "tracing the pipeline", 0, 1, model_id)
    with stage("load"):
        adapter = pipeline_adapter(stats, str(stats_path), model_id, device)
    adapter.check_conditions(request.conditions)
    report(progress, "tracing the pipeline", 1, 1, adapter.description)
    with written_whole(out) as tmp:
        report(progress, "exporting the text and VAE parts", 0, 1, adapter.description)
        with stage("text and VAE parts"):
            pipeline = write_parts(adapter.binding, tmp, config.recipe.parts.precision)
            release_parts(adapter.binding)  # their weights are not held under the transformer's export
        report(progress, "exporting the text and VAE parts", 1, 1, adapter.description)
        built, emit, legality = emit_models(
            adapter, stats, config, target, tmp, layer_ids(list(stats.layers)), progress
        )
        manifest = _manifest(adapter, stats, config, target, built, pipeline)
        manifest["files"] = files_record(emit)
        manifest["legality"] = legality_record(legality)
        manifest["calibration"]["file"] = str(Path(stats_path).resolve())
        write_manifest(tmp, manifest)
    return PipelineBuild(folder=out, adapter=adapter, stats=stats, ranges=built, manifest=manifest,
                         seconds=time.perf_counter() - start, legality=legality)  # fmt: skip


def _manifest(
    adapter: PipelineAdapter, stats: QStats, config: BuildConfig, target: TargetProfile, built: list[BuiltRange],
    pipeline: dict[str, Any],
) -> dict[str, Any]:  # fmt: skip
    binding = adapter.binding
    range_of = {s: r.index for r in built for s in r.steps}
    fixed = config.ranges is None
    return {
        **identity_record(adapter),
        "pipeline": {**pipeline, "denoiser": None},
        "scheduler": binding.block,
        "latent_shape": list(adapter.latent_shape),
        "steps": [
            {
                "index": i,
                "timestep": row["timestep"],
                "range": range_of[i],
                "model": built[range_of[i]].model_file,
                "timestep_fixed": fixed,
            }
            for i, row in enumerate(binding.block["steps"])
        ],
        "ranges": ranges_record(built, config.quant),
        "quantization": quantization_record(config, target, stats, built),
        "recipe": config.recipe.to_dict(),
        "choices": [serial.to_dict(choices_of(r, config.quant)) for r in built],
        **target_record(target),
        "calibration": {k: stats.header[k] for k in ("prompts_hash", "prompts", "seeds", "samples", "config_hash")},
        "layer_ids": layer_ids(list(stats.layers)),
        "verification": None,
    }


def replan_pipeline(
    manifest: dict[str, Any], stats_path: Path | None, device: str = "cpu", model: ModelRequest | None = None,
    folder: Path | None = None,
) -> tuple[PipelineAdapter, list[RangePlan]]:  # fmt: skip
    """The adapter and per-range plans of an emitted pipeline build (for ``qexport verify``): the
    pipeline traced (on `device`) and bound again, then planned as the build planned it
    (exporter.build.replan, which takes `model` and `folder`).

    Raises:
        QexportError: as replan, and as pipeline_adapter.
    """

    def loader(stats: QStats, source: str, model_id: str) -> PipelineAdapter:
        adapter = pipeline_adapter(stats, source, model_id, device)
        adapter.check_conditions(() if model is None else model.conditions)
        return adapter

    adapter, plans, _ = replan(manifest, stats_path, model, loader, folder)
    assert isinstance(adapter, PipelineAdapter)
    return adapter, plans
