"""The deterministic sampling loop: DDIM (eta = 0) from diffusers, N steps, classifier-free
guidance with batch = cond + uncond, noise drawn by numpy from the seed alone so that a
runtime without torch can draw the same noise."""

from __future__ import annotations

from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass

import numpy as np
import torch

from qexport.errors import QexportError
from qexport.models.adapter import ModelAdapter

StepCallback = Callable[[int, int], None]  # (step index, batch) before each denoiser call

AUTOCAST = {"fp32": None, "fp16": torch.float16, "bf16": torch.bfloat16}  # --dtype choices


def autocast_dtype(name: str, device: str | torch.device) -> torch.dtype | None:
    """The autocast dtype for --dtype NAME on DEVICE: "auto" is fp16 on CUDA and fp32 elsewhere.

    Raises:
        QexportError: an unknown name.
    """
    if name == "auto":
        return torch.float16 if torch.device(device).type == "cuda" else None
    if name not in AUTOCAST:
        raise QexportError(f"--dtype must be one of auto, {', '.join(AUTOCAST)}; got {name!r}")
    return AUTOCAST[name]


@dataclass(frozen=True, kw_only=True)
class SamplingConfig:
    """Steps and guidance of the sampling loop (the paper's setting: 20 steps, CFG 7.0)."""

    steps: int = 20
    cfg: float = 7.0

    def __post_init__(self) -> None:
        if not 1 <= self.steps <= 1000:
            raise QexportError(f"steps must be in 1..1000, got {self.steps}")
        if self.cfg < 0:
            raise QexportError(f"cfg must be >= 0, got {self.cfg}")


def initial_noise(latent_shape: tuple[int, ...], seed: int) -> np.ndarray:
    """Standard normal float32 noise for one sample, from numpy's PCG64 seeded with seed."""
    return np.random.default_rng(seed).standard_normal(latent_shape, dtype=np.float32)


def timesteps(adapter: ModelAdapter, steps: int) -> list[int]:
    scheduler = adapter.make_scheduler()
    scheduler.set_timesteps(steps)
    return [int(t) for t in scheduler.timesteps]


def sample(
    adapter: ModelAdapter,
    cond: torch.Tensor,
    seeds: list[int],
    config: SamplingConfig,
    on_step: StepCallback | None = None,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Run the FP sampling loop for a batch of conditions: the model's pipeline
    (``QexportPipeline``) called from each seed's numpy noise, as calibration calls it.

    Args:
        adapter: the model.
        cond: conditioning for each sample (from ``adapter.conditioner.encode``).
        seeds: one noise seed per sample.
        config: steps and CFG scale.
        on_step: called with (step index, batch) before each denoiser call, the step taken from
            the scheduler's step count (``models.pipeline.tracing``).
        device: where the denoiser runs.
        dtype: run the loop under autocast to this dtype (fp32 weights kept), or None for fp32.

    Returns:
        Final latents [B, *latent_shape] on the CPU, float32.
    """
    from qexport.models.builtin_pipeline import QexportPipeline
    from qexport.models.pipeline import tracing

    if len(seeds) != len(cond):
        raise QexportError(f"{len(cond)} conditions but {len(seeds)} seeds")
    pipe = QexportPipeline.of(adapter).to(device)
    x = torch.from_numpy(np.stack([initial_noise(adapter.latent_shape, s) for s in seeds]))
    kind = torch.device(device).type
    run = {"num_inference_steps": config.steps, "guidance_scale": config.cfg, "latents": x, "output_type": "latent"}
    autocast = torch.autocast(kind, dtype=dtype) if dtype is not None else nullcontext()
    with autocast, tracing(pipe, on_step, keep=False) if on_step is not None else nullcontext():
        out = pipe.denoise(cond, **run, generator=None)
    return out.images


def generate(
    adapter: ModelAdapter,
    prompts: list[str],
    seeds: list[int],
    config: SamplingConfig,
    batch_size: int = 8,
    progress: Callable[[int], None] | None = None,
    device: str | torch.device = "cpu",
) -> np.ndarray:
    """Sample one output per (prompt, seed) pair, batched; returns decoded uint8 pixels.

    progress, if given, is called with the number of samples finished after each batch.
    """
    if len(prompts) != len(seeds):
        raise QexportError(f"{len(prompts)} prompts but {len(seeds)} seeds")
    cond = adapter.conditioner.encode(prompts)  # validates every prompt before any work
    outputs = []
    for start in range(0, len(prompts), batch_size):
        stop = start + batch_size
        latents = sample(adapter, cond[start:stop], seeds[start:stop], config, device=device)
        outputs.append(adapter.decode(latents))
        if progress is not None:
            progress(len(latents))
    return np.concatenate(outputs)
