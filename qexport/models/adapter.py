"""Model adapters: one object that gives the denoiser, conditioning, scheduler, latent shape
and decoding for a built-in model, a user's diffusers folder, or a named full-size config."""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass, field
from typing import Any, cast

import numpy as np
import torch
from diffusers import DDIMScheduler
from torch import nn

from qexport.errors import QexportError
from qexport.models.conditioning import Conditioner
from qexport.models.families import Family, family_of

log = logging.getLogger(__name__)

SCHEDULER_CONFIG: dict[str, Any] = {
    "num_train_timesteps": 1000,
    "beta_schedule": "linear",
    "beta_start": 0.0001,
    "beta_end": 0.02,
    "clip_sample": False,  # keeps each DDIM step affine in (x, eps)
    "set_alpha_to_one": True,
    "timestep_spacing": "trailing",
    "prediction_type": "v_prediction",  # built-ins; a user folder's scheduler config overrides
}


def config_hash(class_name: str, config: dict[str, Any]) -> str:
    """sha256 of a transformer class and its config, private keys left out (a model's identity)."""
    cfg = {k: v for k, v in config.items() if not k.startswith("_")}
    text = json.dumps({"class": class_name, "config": cfg}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


class Denoiser(nn.Module):
    """Uniform step signature over diffusers transformers: (latents, timestep, cond) -> model output
    (eps or v, as the scheduler's prediction_type says).

    cond is caption embeddings [B, tokens, dim] (Latte, PixArt) or class ids [B] (DiT).
    Models that learn sigma (out_channels = 2 x in_channels) return the prediction half only.
    """

    def __init__(self, transformer: nn.Module, class_name: str, in_channels: int) -> None:
        super().__init__()
        self.transformer = transformer
        call = family_of(class_name).call
        if call is None:
            raise QexportError(f"{class_name} runs only through its pipeline's own __call__ (qexport.models.pipeline)")
        self.call: str = call
        self.in_channels = in_channels

    def forward(self, latents: torch.Tensor, timestep: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        extra: dict[str, Any] = {}
        if self.call == "pixart":
            extra = {"encoder_hidden_states": cond, "added_cond_kwargs": {"resolution": None, "aspect_ratio": None}}
        else:
            extra = {self.call: cond}
        out = self.transformer(latents, timestep=timestep, return_dict=False, **extra)[0]
        return out[:, : self.in_channels]


@dataclass(kw_only=True)
class ModelAdapter:
    """Everything the sampling loop, calibration and export need to know about one model."""

    model_id: str
    class_name: str
    transformer: nn.Module
    conditioner: Conditioner
    latent_shape: tuple[int, ...]
    description: str
    random_init: bool = False
    pixel_latents: bool = False  # built-in models denoise RGB pixels in [-1, 1] directly
    vae: Any = None  # a diffusers AutoencoderKL when the folder has vae/
    scheduler_config: dict[str, Any] = field(default_factory=lambda: dict(SCHEDULER_CONFIG))

    @property
    def family(self) -> Family:
        """The registry entry of the transformer's class."""
        return family_of(self.class_name)

    @property
    def is_video(self) -> bool:
        return len(self.latent_shape) == 4

    @property
    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.transformer.parameters())

    def denoiser(self) -> Denoiser:
        return Denoiser(self.transformer, self.class_name, self.latent_shape[0]).eval()

    def export_inputs(self) -> tuple[nn.Module, tuple[torch.Tensor, ...], list[str]]:
        """The module the FP export traces, its example inputs and their ONNX names."""
        x, t, cond = self.example_inputs(batch=2)
        return self.denoiser(), (x, t, cond), ["latents", "timestep", "cond"]

    def step_input(self, timestep: float) -> tuple[str, float]:
        """The exported graph's timestep input and the value it takes at a step of this timestep
        (a per-step model has it fixed)."""
        return "timestep", timestep

    def make_scheduler(self) -> DDIMScheduler:
        return DDIMScheduler.from_config(self.scheduler_config)

    def config_hash(self) -> str:
        """sha256 of the transformer class and config (the identity a .qstats file records)."""
        return config_hash(self.class_name, dict(cast(Any, self.transformer).config))

    def example_inputs(self, batch: int = 2) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Static inputs for one step: latents, timesteps, conditioning (CFG: cond + uncond)."""
        x = torch.zeros(batch, *self.latent_shape)
        t = torch.full((batch,), 500, dtype=torch.long)
        return x, t, self.conditioner.null(batch)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> np.ndarray:
        """Latents -> uint8 pixels [B, F, H, W, 3] (video) or [B, H, W, 3] (image)."""
        x = latents.float()
        if self.is_video:  # [B, C, F, H, W] -> [B*F, C, H, W]
            b, c, f, h, w = x.shape
            x = x.permute(0, 2, 1, 3, 4).reshape(b * f, c, h, w)
        if self.vae is not None:
            x = self.vae.decode(x / self.vae.config.scaling_factor).sample
        elif not self.pixel_latents:
            log.info("no VAE: decoding shows the first 3 latent channels")
            x = x[:, :3] / 4.0
        pixels = ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
        if self.is_video:
            return pixels.reshape(b, f, *pixels.shape[1:])
        return pixels
