"""``calibrate`` through a user's diffusers pipeline: its own ``__call__`` (scheduler, prompt
encoding, masks, guidance, shapes) samples every (prompt, seed), while forward pre-hooks on the
transformer's chosen linears collect the per-step statistics. The step of each transformer call
comes from the scheduler's step count (a pipeline may call the transformer more than once per
step), the batch from the call's own input. The header records how the pipeline set up its
scheduler (the build's scheduler block is probed from it and checked) and the transformer's
keyword inputs."""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from qexport.calib.collect import Collector
from qexport.calib.run import CalibResult, file_header
from qexport.calib.selection import LayerSelection, select_layers
from qexport.calib.store import QStats

from qexport.errors import QexportError
from qexport.models.adapter import config_hash
from qexport.models.families import family_for
from qexport.models.pipeline import (
    Trace,
    TransformerCall,
    check_prompts,
    denoisers,
    label_ids,
    length_fixes,
    load_pipeline,
    sample_shape,
    starting_from,
    takes_labels,
    trace_call,
)
from qexport.models.sampler import initial_noise
from qexport.models.scheduler import check, probe, refuse_unsupported
from qexport.progress import Progress, Units
from qexport.schema import plain_json


@dataclass(frozen=True, kw_only=True)
class PipelineCalibConfig:
    """Prompts x seeds, the step count, and the pipeline call's other arguments (height, width,
    num_frames, guidance_scale, max_sequence_length, ...: whatever that pipeline takes)."""

    prompts: tuple[str, ...]
    seeds: tuple[int, ...] = (0,)
    steps: int = 20
    call: dict[str, Any] = field(default_factory=dict)
    include: tuple[str, ...] = ()  # default: the family's blocks
    exclude: tuple[str, ...] = ()
    histograms: bool = False
    device: str = "cpu"  # where the pipeline samples ("cuda" at full size); statistics are gathered there too

    def __post_init__(self) -> None:
        if not self.prompts:
            raise QexportError("no calibration prompts given")
        if not self.seeds:
            raise QexportError("no seeds given")
        if not 1 <= self.steps <= 1000:
            raise QexportError(f"--steps must be in 1..1000, got {self.steps}")
        taken = {
            "prompt",
            "class_labels",
            "num_inference_steps",
            "generator",
            "latents",
            "output_type",
            "callback_on_step_end",
        }
        if clash := sorted(taken & set(self.call)):
            raise QexportError(f"pipeline argument {clash[0]!r} is set by calibration itself; drop it")
        try:
            json.dumps(self.call)
        except (TypeError, ValueError) as exc:
            raise QexportError(f"pipeline arguments must be plain values (numbers, text, lists): {exc}") from exc


def calibrate_pipeline(folder: Path, config: PipelineCalibConfig, progress: Progress | None = None) -> CalibResult:
    """Per-layer, per-step activation statistics from the pipeline's own sampling loop.

    Raises:
        QexportError: an unloadable folder, a pipeline with two denoisers, a transformer class
            without a family entry, an unsupported scheduler, a prompt longer than a tokenizer
            takes, patterns that match nothing, before any sampling.
    """
    start = time.perf_counter()
    pipe = load_pipeline(folder)
    found = denoisers(pipe)
    if list(found) != ["transformer"]:
        raise QexportError(f"{type(pipe).__name__} has denoisers {', '.join(found)}; one transformer is supported")
    transformer = found["transformer"]
    family = family_for(transformer)
    refuse_unsupported(pipe.scheduler)
    labels = takes_labels(pipe)
    if labels:  # class-conditional (DiT): each "prompt" is a class label or id
        ids = dict(zip(config.prompts, label_ids(pipe, list(config.prompts)), strict=True))
    else:
        check_prompts(pipe, list(config.prompts), config.call)
    if fixes := length_fixes(pipe, config.call):  # the build would refuse it: say so before sampling
        raise QexportError(
            f"{type(pipe).__name__} cuts its caption embeddings to each prompt's length unless told not to, and "
            f"a fixed-shape edge model cannot follow that; calibrate with {' '.join(fixes)}"
        )

    def condition(prompt: str) -> dict[str, Any]:
        return {"class_labels": [ids[prompt]]} if labels else {"prompt": prompt}

    selection = LayerSelection(include=config.include or (family.blocks,), exclude=config.exclude)
    selected = select_layers(transformer, selection)
    device = torch.device(config.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise QexportError(f"--device {config.device}: torch sees no CUDA device here")
    pipe.to(device)
    collector = Collector(selected.layers, config.steps, config.histograms, device)
    runs = [(p, s) for s in config.seeds for p in config.prompts]
    units = Units(progress, "calibrating (pipeline runs)", len(runs))
    units.start(f"{len(runs)} run(s) of {type(pipe).__name__}, {config.steps} steps")

    def on_call(step: int, batch: int) -> None:
        if step >= config.steps:
            raise QexportError(f"{type(pipe).__name__} called its transformer after step {config.steps}")
        collector.step = step
        collector.samples = batch

    traces: list[Trace] = []
    shape = sample_shape(pipe, **condition(config.prompts[0]), num_inference_steps=config.steps,
                         output_type="latent", **config.call)  # fmt: skip
    try:
        for prompt, seed in runs:
            noise = torch.from_numpy(initial_noise(shape[1:], seed)[None])  # the edge loop's noise for this seed
            generator = torch.Generator("cpu").manual_seed(seed)
            run = {**condition(prompt), "num_inference_steps": config.steps, **config.call}
            with starting_from(pipe, noise) as given:
                traces.append(trace_call(pipe, on_call, generator=generator, output_type="latent", **run, **given))
            if len(traces[-1].samples) != config.steps:
                raise QexportError(f"{type(pipe).__name__} ran {len(traces[-1].samples)} steps, not {config.steps}")
            units.done(f"seed {seed}")
    finally:
        layers = collector.close()
    header = _header(folder, pipe, traces[0], config, selected.layers, selected.excluded)
    return CalibResult(stats=QStats(header=header, layers=layers), hooked=len(selected.layers),
                       excluded=selected.excluded, batches=len(runs), seconds=time.perf_counter() - start,
                       finals=[t.results[-1] for t in traces])  # fmt: skip


def _call(call: TransformerCall) -> dict[str, Any]:
    """One transformer call's inputs as JSON: tensors by shape and dtype, other values by repr."""
    return {"step": call.step, "tensors": {k: asdict(v) for k, v in call.tensors.items()},
            "values": {k: repr(v) for k, v in call.values.items()}}  # fmt: skip


def _header(
    folder: Path, pipe: Any, trace: Trace, config: PipelineCalibConfig, layers: dict, excluded: list[str]
) -> dict[str, Any]:
    transformer = pipe.transformer
    block = probe(trace.scheduler, config.steps, trace.set_timesteps)
    check(trace.scheduler, block)
    return {
        **file_header(config.prompts, layers, excluded, config.histograms),
        "model_id": f"diffusers:{Path(folder).resolve()}",
        "class_name": type(transformer).__name__,
        "pipeline": type(pipe).__name__,
        "config_hash": config_hash(type(transformer).__name__, dict(transformer.config)),
        "steps": config.steps,
        "timesteps": [s["timestep"] for s in block["steps"]],
        "scheduler": plain_json(block),
        "transformer_calls": [_call(c) for c in trace.calls if c.step == 0],
        "call": dict(config.call),  # the build traces the pipeline with the same arguments
        "seeds": list(config.seeds),
        "noise": "latents= numpy PCG64 standard normal from the seed (qexport run's), the pipeline scales it",
        "samples": len(config.prompts) * len(config.seeds),
        "shard": None,
    }
