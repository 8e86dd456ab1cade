"""``eval``: run FP (torch) and each build's emitted models (the numpy + onnxruntime loop) from the
same noise over prompts x seeds, and measure the difference: final PSNR / SSIM vs FP, judge
adherence and temporal consistency, the divergence of the frame relations from FP's (Q-VDiT),
per-step SQNR of the denoiser output on the FP trajectory, model size and per-step latency."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import torch

from qexport.errors import QexportError
from qexport.metrics import psnr_db, sqnr_db, ssim, standard_error, temporal_kl
from qexport.models.adapter import ModelAdapter
from qexport.models.judge import score
from qexport.models.registry import ModelRequest, check_conditions, load_model
from qexport.models.sampler import SamplingConfig, sample
from qexport.progress import Progress, Units
from qexport.runtime.conditioning import Conditioning
from qexport.runtime.files import model_path, open_session
from qexport.runtime.kv import PromptFeeds, select
from qexport.runtime.loop import Pipeline, decode_pixels, session_options
from qexport.runtime.manifest import read_manifest


@dataclass(kw_only=True)
class Scores:
    psnr_db: float | None = None  # mean over prompt x seed samples
    psnr_se_db: float | None = None  # standard error of that mean (None for one sample)
    psnr_samples: list[float] = field(default_factory=list)  # per sample, prompts within seeds
    ssim: float | None = None
    adherence: float | None = None
    accuracy: dict[str, float] = field(default_factory=dict)
    temporal_consistency: float | None = None
    temporal_kl: float | None = None  # vs FP, mean over samples (videos only; metrics.temporal_kl)
    temporal_kl_se: float | None = None
    step_sqnr_db: list[float] = field(default_factory=list)  # per step, mean over samples
    model_mib: float | None = None
    step_ms: float | None = None


@dataclass(kw_only=True)
class EvalResult:
    model_id: str
    prompts: list[str]
    seeds: list[int]
    fp: Scores
    builds: dict[str, Scores]
    first_samples: dict[str, np.ndarray] = field(default_factory=dict)  # "FP" / build -> first pair's pixels

    def to_json(self) -> dict[str, Any]:
        return {"model_id": self.model_id, "prompts": self.prompts, "seeds": self.seeds, "fp": asdict(self.fp),
                "builds": {k: asdict(v) for k, v in self.builds.items()}}  # fmt: skip


def _fp_run(adapter: ModelAdapter, prompt: str, seed: int, config: SamplingConfig) -> tuple[torch.Tensor, list, list]:
    """FP latents, and per step the denoiser's inputs (x) and guided-free raw outputs (batch 2)."""
    xs: list[np.ndarray] = []
    outs: list[np.ndarray] = []

    def pre(module: torch.nn.Module, args: tuple[torch.Tensor, ...]) -> None:
        xs.append(args[0].detach().numpy().copy())

    def post(module: torch.nn.Module, args: tuple[torch.Tensor, ...], out: Any) -> None:
        outs.append(out[0][:, : adapter.latent_shape[0]].detach().numpy().copy())  # the eps / v half

    handles = [adapter.transformer.register_forward_pre_hook(pre), adapter.transformer.register_forward_hook(post)]
    try:
        latents = sample(adapter, adapter.conditioner.encode([prompt]), [seed], config)
    finally:
        for h in handles:
            h.remove()
    return latents, xs, outs


def evaluate(
    folders: list[Path],
    prompts: list[str],
    seeds: list[int],
    progress: Progress | None = None,
    threads: int | None = None,
    model: ModelRequest | None = None,
) -> EvalResult:
    """Evaluate builds of one model against its FP sampling.

    Args:
        progress: ticks of one task: each FP sample, each build's sample, each build's per-step
            SQNR pass over one sample.
        threads: onnxruntime intra-op threads of the emitted models (None: onnxruntime's default).
        model: which model to load for the builds' model id (a folder only with consent, see
            ModelRequest; the user's own must match the builds' config hash).

    Raises:
        QexportError: builds of different models or step schedules, a model folder without consent,
            another model than the builds', bad prompts.
    """
    request = model or ModelRequest()
    manifests = [read_manifest(f) for f in folders]
    ids = {(m["model_id"], len(m["steps"]), m["cfg"]) for m in manifests}
    if len(ids) != 1:
        raise QexportError(f"builds differ in model, steps or CFG: {sorted(ids)}; evaluate one model's builds together")
    model_id, steps, cfg = ids.pop()
    load_id = request.model_id(model_id, str(Path(folders[0]) / "manifest.json"), "built from it")
    pairs = [(p, s) for s in seeds for p in prompts]
    units = Units(progress, "evaluating (samples)", len(pairs) * (1 + 2 * len(folders)))
    check_conditions(load_id, tuple(prompts))  # every prompt, before any work
    units.start(f"loading {load_id}")
    adapter = load_model(load_id)
    if adapter.config_hash() != manifests[0].get("config_hash"):
        raise QexportError(
            f"{load_id} (config {adapter.config_hash()}) is not the model {folders[0]} was built from "
            f"({model_id}, config {manifests[0].get('config_hash')}); pass that model with --model"
        )
    config = SamplingConfig(steps=steps, cfg=cfg)
    fp_pixels, trajectories = [], []
    for p, s in pairs:
        latents, xs, outs = _fp_run(adapter, p, s, config)
        fp_pixels.append(adapter.decode(latents)[0])
        trajectories.append((xs, outs))
        units.done(f"FP {p!r} seed {s}")
    captions = [p for p, _ in pairs]
    fp_report = score(fp_pixels, captions) if adapter.pixel_latents else None
    result = EvalResult(model_id=model_id, prompts=prompts, seeds=seeds, fp=_judge_scores(fp_report), builds={})
    result.first_samples["FP"] = fp_pixels[0]
    for folder, manifest in zip(folders, manifests, strict=True):
        scores, first = _eval_build(folder, manifest, adapter, pairs, fp_pixels, trajectories, units, threads)
        result.builds[str(folder)] = scores
        result.first_samples[str(folder)] = first
    return result


def layer_step_sqnr(
    adapter: ModelAdapter, plans: list[Any], manifest: dict[str, Any], prompt: str, seed: int
) -> tuple[list[str], np.ndarray]:
    """SQNR (dB) of every quantized linear's output, simulated vs FP, per step on the FP trajectory.

    Returns the layer names and an array [layers, steps]. A value projection whose output carries
    a fold of the attention-output linear (smoothing's 1/s, the shift, a head rotation) is NaN at
    that step: its output is transformed on purpose and is not comparable with FP's.
    """
    from qexport.exporter.simulate import simulated

    config = SamplingConfig(steps=len(manifest["steps"]), cfg=manifest["cfg"])
    _, xs, _ = _fp_run(adapter, prompt, seed, config)
    cond = torch.cat([adapter.conditioner.encode([prompt]), adapter.conditioner.null(1)])
    layers = list(plans[0].layers)
    modules = dict(adapter.transformer.named_modules())
    denoiser = adapter.denoiser()
    table = np.zeros((len(layers), len(manifest["steps"])))
    for k, step in enumerate(manifest["steps"]):
        x, t = torch.from_numpy(xs[k]), torch.full((2,), step["timestep"], dtype=torch.long)
        captured: dict[str, list[np.ndarray]] = {name: [] for name in layers}
        hooks = [
            modules[n].register_forward_hook(lambda m, a, o, n=n, c=captured: c[n].append(o.detach().numpy()))
            for n in layers
        ]
        try:
            with torch.no_grad():
                denoiser(x, t, cond)
                with simulated(adapter.transformer, plans[step["range"]]):
                    denoiser(x, t, cond)
        finally:
            for h in hooks:
                h.remove()
        folded = _folded_values(plans[step["range"]], layers)
        for i, name in enumerate(layers):
            fp, q = captured[name]
            table[i, k] = np.nan if name in folded else sqnr_db(fp, q)
    return layers, table


def _folded_values(plan: Any, layers: list[str]) -> set[str]:
    """The value projections a range's plan folds the next linear's transform into."""
    return set(plan.value_folds) & set(layers)


def _judge_scores(report: Any) -> Scores:
    if report is None:
        return Scores()
    return Scores(
        adherence=report.adherence, accuracy=report.accuracy, temporal_consistency=report.temporal_consistency
    )


def _eval_build(
    folder: Path,
    manifest: dict[str, Any],
    adapter: ModelAdapter,
    pairs: list[tuple[str, int]],
    fp_pixels: list[np.ndarray],
    trajectories: list[tuple[list, list]],
    units: Units,
    threads: int | None,
) -> tuple[Scores, np.ndarray]:
    pipeline = Pipeline(folder, threads=threads)
    conditioning = Conditioning(folder, manifest)  # the deployed path: what `qexport run` does
    pixels, step_times = [], []
    for p, s in pairs:
        run = pipeline.run(conditioning.encode(p), conditioning.null(), s)
        pixels.append(decode_pixels(run.latents, manifest))
        step_times.extend(run.step_seconds)
        units.done(f"{folder.name} {p!r} seed {s}")
    scores = _judge_scores(score(pixels, [p for p, _ in pairs]) if adapter.pixel_latents else None)
    scores.psnr_samples = [psnr_db(a, b) for a, b in zip(fp_pixels, pixels, strict=True)]
    scores.psnr_db = float(np.mean(scores.psnr_samples))
    scores.psnr_se_db = standard_error(scores.psnr_samples)
    scores.ssim = float(np.mean([ssim(a, b) for a, b in zip(fp_pixels, pixels, strict=True)]))
    if np.asarray(fp_pixels[0]).ndim == 4 and len(fp_pixels[0]) > 1:  # clips [F, H, W, C]
        kls = [temporal_kl(a, b) for a, b in zip(fp_pixels, pixels, strict=True)]
        scores.temporal_kl, scores.temporal_kl_se = float(np.mean(kls)), standard_error(kls)
    scores.step_sqnr_db = _step_sqnr(folder, manifest, adapter, pairs, trajectories, units, threads)
    scores.model_mib = sum(f.stat().st_size for f in folder.iterdir() if f.suffix in (".onnx", ".bin")) / 2**20
    scores.step_ms = 1e3 * float(np.median(step_times))
    return scores, pixels[0]


def _step_sqnr(
    folder: Path,
    manifest: dict[str, Any],
    adapter: ModelAdapter,
    pairs: list[tuple[str, int]],
    trajectories: list[tuple[list, list]],
    units: Units,
    threads: int | None,
) -> list[float]:
    """Per step: SQNR of the emitted model's output vs FP's, both fed the FP trajectory's input."""
    sessions: dict[str, ort.InferenceSession] = {}
    per_step: list[list[float]] = [[] for _ in manifest["steps"]]
    with_t = "timestep" in {i["name"] for i in manifest["inputs"]}
    conditioning = Conditioning(folder, manifest)
    prompt_feeds = PromptFeeds(folder, manifest, session_options(threads))
    for (p, _), (xs, outs) in zip(pairs, trajectories, strict=True):
        prompt = prompt_feeds.feeds(np.concatenate([conditioning.encode(p), conditioning.null()]))
        for k, step in enumerate(manifest["steps"]):
            model = step["model"]
            if model not in sessions:
                sessions[model] = open_session(model_path(folder, model), session_options(threads))
            feeds = {"latents": xs[k], **prompt}
            if with_t:
                feeds["timestep"] = np.full((2,), step["timestep"], dtype=np.int64)
            per_step[k].append(sqnr_db(outs[k], sessions[model].run(None, select(sessions[model], feeds))[0]))
        units.done(f"{folder.name} per-step SQNR {p!r}")
    return [float(np.mean(v)) for v in per_step]


def write_json(result: EvalResult, path: Path) -> None:
    from qexport.media import atomic_write

    atomic_write(path, lambda p: Path(p).write_text(json.dumps(result.to_json(), indent=2)))
