"""Verification of a pipeline build (exporter.pipeline_build): the FP loop runs the torch transformer
through the edge loop itself (runtime.pipeline_loop: the shipped text parts, the bound inputs, the
scheduler block), and at each model's first step the emitted model is fed exactly what that loop
fed the transformer. Each model: onnx.checker, integer kernels read off onnxruntime's optimised
graph, and its output against the torch simulation of its plan (cosine, LSB bound) and FP. End to
end: the quantized loop against the FP loop from the same numpy noise (latents SQNR, pixels PSNR)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
from qexport.exporter.pipeline_build import PipelineAdapter
from qexport.exporter.simulate import simulated
from qexport.passes.plan import RangePlan
from qexport.targets.catalog import RUNTIMES
from qexport.targets.profile import TargetProfile
from qexport.verification.verify import (
    PERTURBATION,
    ModelCheck,
    Verification,
    classify,
    compare,
    expected_by_width,
    integer_inputs,
    optimized_session,
    torch_on,
)

from qexport.errors import QexportError
from qexport.metrics import psnr_db, sqnr_db
from qexport.progress import Progress, Units
from qexport.runtime.files import model_path
from qexport.runtime.loop import initial_noise
from qexport.runtime.pipeline_loop import PipelineLoop
from qexport.runtime.scheduler import EdgeScheduler

DEFAULT_PROMPT = "a photo of a cat"  # any caption serves: the check compares models on the same inputs
DEFAULT_LABEL = "0"  # and any class of a class-conditional build (DiT), which the default caption stands for


def start_sample(manifest: dict[str, Any], seed: int) -> np.ndarray:
    """The first sample [1, ...] the edge loop starts from (numpy noise from the seed)."""
    return EdgeScheduler.of(manifest, seed).start(initial_noise(tuple(manifest["latent_shape"]), seed))[None]


class TorchDenoiser:
    """The bound transformer in torch, called as the edge loop calls a model; records the feeds of
    every call (step -> list of feeds)."""

    def __init__(self, adapter: PipelineAdapter) -> None:
        self.model = adapter.denoiser()
        self.latents = [i["name"] for i in adapter.binding.calls[0]["inputs"] if i["source"] == "latents"]
        self.feeds: dict[int, list[dict[str, np.ndarray]]] = {}

    def __call__(self, step: int, feeds: dict[str, np.ndarray]) -> np.ndarray:
        self.feeds.setdefault(step, []).append(feeds)
        return self.output(feeds)

    @torch.no_grad()
    def output(self, feeds: dict[str, np.ndarray], scale: float = 1.0) -> np.ndarray:
        """The model's output on feeds (not recorded), its latents scaled by `scale`."""
        where = next(self.model.transformer.parameters()).device
        args = [torch.from_numpy(feeds[n] * np.float32(scale) if n in self.latents else feeds[n]).to(where)
                for n in self.model.names]  # fmt: skip
        return self.model(*args).float().cpu().numpy()


def verify_pipeline(
    folder: Path,
    adapter: PipelineAdapter,
    plans: list[RangePlan],
    manifest: dict[str, Any],
    target: TargetProfile,
    condition: str,
    seed: int = 0,
    threads: int | None = None,
    progress: Progress | None = None,
    only: list[int] | None = None,
    device: str = "cpu",
) -> Verification:
    """Verify the emitted models of a pipeline build and its end-to-end loop (module docstring),
    run with `condition`: a prompt, or a class label of a class-conditional build. `only`: the
    models (indexes into the manifest's ranges) to check; the end-to-end loop, which needs every
    model, is then not run. `device`: where torch runs the FP loop and the simulation (cuda at full
    size); the emitted models run on onnxruntime's CPU provider.

    Raises:
        QexportError: an index in `only` the build does not have; a device torch cannot see.
    """
    if "labels" in manifest["pipeline"] and condition == DEFAULT_PROMPT:
        condition = DEFAULT_LABEL
    q = manifest["quantization"]
    types = (target.weight_type(q["w_bits"]), target.activation_type(q["a_bits"]))
    widths = {lp.w_grid.storage for plan in plans for lp in plan.layers.values()}
    native = any(RUNTIMES["onnxruntime"].runs_integer(w, types[1]) for w in widths)
    chosen = list(range(len(plans))) if only is None else sorted(set(only))
    if bad := [i for i in chosen if not 0 <= i < len(plans)]:
        raise QexportError(f"no model {bad[0]} in this build; it has models 0..{len(plans) - 1}")
    units = Units(progress, "verifying", 1 + len(chosen) + (only is None))
    units.start("FP loop")
    loop = PipelineLoop(folder, manifest, threads)
    start = start_sample(manifest, seed)
    checks = []
    with torch_on(adapter, device):
        fp = TorchDenoiser(adapter)
        fp_latents, fp_images = loop.run(condition, start, denoise=fp, decode=only is None)  # pixels: end to end
        units.done("FP loop")
        for index in chosen:
            checks.append(_check_one(folder, manifest, adapter, fp, plans[index], index, types, threads))
            units.done(checks[-1].model)
    if only is not None:
        return Verification(models=checks, end_to_end={}, native=native)
    began = time.perf_counter()
    q_latents, q_images = loop.run(condition, start)
    step_ms = 1e3 * (time.perf_counter() - began) / len(manifest["steps"])  # with the text parts and the VAE
    e2e = {"sqnr_latents_db": sqnr_db(fp_latents, q_latents), "step_ms": step_ms}
    if fp_images is not None and q_images is not None:
        e2e["psnr_db"] = psnr_db((fp_images * 255).round(), (q_images * 255).round())
    units.done("end-to-end loop")
    return Verification(models=checks, end_to_end=e2e, native=native)


def _check_one(
    folder: Path, manifest: dict[str, Any], adapter: PipelineAdapter, fp: TorchDenoiser, plan: RangePlan,
    index: int, types: tuple[str, str], threads: int | None,
) -> ModelCheck:  # fmt: skip
    """One emitted model at its range's first step, on every call's feeds of that step (joined)."""
    r, ids = manifest["ranges"][index], manifest["layer_ids"]
    path = model_path(folder, r["model"])
    onnx.checker.check_model(str(path))
    check = ModelCheck(model=r["model"], steps=r["steps"])
    layers = list(plan.layers)
    expected = expected_by_width(path, layers, ids, RUNTIMES["onnxruntime"], plan, types[1])
    session, optimized = optimized_session(path, threads)
    reads = {layer: [f"{ids[layer]}:w_q"] for layer in layers}
    check.integer, check.emulated, check.float_ = classify(layers, reads, integer_inputs(optimized), expected)
    names = {i.name for i in session.get_inputs()}
    calls = fp.feeds[r["steps"][0]]
    got = np.concatenate([session.run(None, {k: v for k, v in f.items() if k in names})[0] for f in calls])
    want = np.concatenate([fp.output(f) for f in calls])
    with simulated(adapter.transformer, plan):
        sim = np.concatenate([fp.output(f) for f in calls])
        moved = np.concatenate([fp.output(f, 1 + PERTURBATION) for f in calls])
    compare(check, want, sim, moved, got)
    return check
