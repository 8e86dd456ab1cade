"""The denoising loop from manifest.json alone: one onnxruntime session per range (loaded once,
the next range's prefetched in the background), CFG on the batch of 2, and the scheduler's step
from the manifest (runtime.scheduler)."""

from __future__ import annotations

import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from qexport.errors import QexportError
from qexport.progress import Progress, Units
from qexport.runtime.cpu import exact_int8
from qexport.runtime.files import model_path, open_session, run_session
from qexport.runtime.kv import PromptFeeds, select
from qexport.runtime.manifest import read_manifest
from qexport.runtime.scheduler import EdgeScheduler


def initial_noise(latent_shape: tuple[int, ...], seed: int) -> np.ndarray:
    """The same noise as the torch sampler: numpy PCG64 seeded with seed, float32."""
    return np.random.default_rng(seed).standard_normal(latent_shape, dtype=np.float32)


def session_options(threads: int | None = None) -> ort.SessionOptions:
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.log_severity_level = 3
    if threads:
        so.intra_op_num_threads = threads
    return exact_int8(so)  # onnxruntime's int8 products exact on CPUs whose kernels would clamp them


@dataclass
class LoopResult:
    latents: np.ndarray
    step_seconds: list[float] = field(default_factory=list)
    swap_seconds: list[float] = field(default_factory=list)  # per step: loading its model, not hidden by prefetch
    prompt_seconds: float = 0.0  # kv.onnx (--precompute-kv builds), once per prompt


ModelOpener = Callable[[Path], ort.InferenceSession]  # a step model's path (checked: files.model_path) -> its session


class Pipeline:
    """Runs the emitted models of one build folder (on onnxruntime's CPU provider, or as open_model
    opens them: e.g. on an NPU's execution provider)."""

    def __init__(
        self,
        folder: Path,
        threads: int | None = None,
        manifest: dict[str, Any] | None = None,
        open_model: ModelOpener | None = None,
    ) -> None:
        self.folder = Path(folder)
        self.manifest: dict[str, Any] = read_manifest(self.folder) if manifest is None else manifest
        self.threads = threads
        self.open_model = open_model
        self._pool = ThreadPoolExecutor(max_workers=1)
        self._sessions: dict[int, Future[ort.InferenceSession]] = {}
        self.prompt = PromptFeeds(self.folder, self.manifest, session_options(threads))

    def _load(self, index: int) -> Future[ort.InferenceSession]:
        if index not in self._sessions:
            self._sessions[index] = self._pool.submit(self._open, self.manifest["ranges"][index]["model"])
        return self._sessions[index]

    def _open(self, name: str) -> ort.InferenceSession:
        path = model_path(self.folder, name)
        if self.open_model is not None:
            return self.open_model(path)
        return open_session(path, session_options(self.threads))

    def run(self, cond: np.ndarray, null: np.ndarray, seed: int, progress: Progress | None = None) -> LoopResult:
        """Sample one output. cond / null: this prompt's and the null condition, batch 1 each;
        progress, if given, gets a tick per denoising step."""
        m = self.manifest
        sampler = EdgeScheduler.of(m, seed)
        x = sampler.start(initial_noise(tuple(m["latent_shape"]), seed))[None]
        both = np.concatenate([cond, null])
        result = LoopResult(latents=x)
        units = Units(progress, "denoising (steps)", len(m["steps"]))
        self._load(m["steps"][0]["range"])
        start = time.perf_counter()
        prompt = self.prompt.feeds(both)
        result.prompt_seconds = time.perf_counter() - start
        for k, step in enumerate(m["steps"]):
            wait = time.perf_counter()
            session = self._load(step["range"]).result()
            result.swap_seconds.append(time.perf_counter() - wait)
            if k and m["steps"][k - 1]["range"] != step["range"]:
                self._sessions.pop(m["steps"][k - 1]["range"], None)  # a finished range frees its memory
            if k + 1 < len(m["steps"]):
                self._load(m["steps"][k + 1]["range"])  # prefetch the next range while this step runs
            start = time.perf_counter()
            seen = sampler.model_input(k, x)
            feeds = {"latents": np.concatenate([seen, seen]).astype(np.float32), **prompt}
            if "timestep" in {i["name"] for i in m["inputs"]}:
                feeds["timestep"] = np.full((2,), step["timestep"], dtype=np.int64)
            out = run_session(session, select(session, feeds), step["model"])[0]
            if list(out.shape) != m["output"]["shape"]:
                raise QexportError(f"{step['model']} gives an output of shape {list(out.shape)}; the manifest says "
                                   f"{m['output']['shape']}: rebuild the folder with qexport build")  # fmt: skip
            out_c, out_u = out
            guided = out_u + np.float32(m["cfg"]) * (out_c - out_u)
            x = sampler.step(k, x[0], guided)[None]
            result.step_seconds.append(time.perf_counter() - start)
            units.done(f"t={step['timestep']}")
        result.latents = x
        return result


def decode_pixels(latents: np.ndarray, manifest: dict[str, Any]) -> np.ndarray:
    """Pixel-space latents [1, C, (F,) H, W] in [-1, 1] -> uint8 [(F,) H, W, 3], as the torch decode does."""
    if not manifest.get("pixel_latents"):
        raise QexportError("this model's latents need a VAE decoder, which the edge loop does not ship")
    x = np.clip(latents[0].astype(np.float32), -1, 1)
    pixels = np.round((x + np.float32(1)) * np.float32(127.5)).astype(np.uint8)
    return np.moveaxis(pixels, 0, -1)  # channels last; video: [F, H, W, 3]
