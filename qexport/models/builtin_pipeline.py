"""The sampling loop of qexport's own models as a diffusers pipeline: ``QexportPipeline`` (captions)
and ``QexportLabelPipeline`` (class labels) run DDIM (or the folder's scheduler) with classifier-free
guidance, batch = cond + uncond, from ``latents=``. Built-ins, bare transformer folders and the
named full-size configs sample through it, and it is what a built-in folder's model_index.json
names, so calibration reaches it the way it reaches a user's pipeline: by calling it and hooking
its transformer."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from diffusers import DiffusionPipeline
from diffusers.pipelines.pipeline_utils import ImagePipelineOutput

from qexport.errors import QexportError
from qexport.models.adapter import Denoiser, ModelAdapter

CLASS_NAMES = ("QexportPipeline", "QexportLabelPipeline")  # what model_index.json may name


class QexportPipeline(DiffusionPipeline):
    """A qexport model as a pipeline: ``pipe(prompt=[...], latents=x)`` samples like the edge loop.

    Built with :meth:`of` from a model adapter (the transformer, its conditioner, scheduler
    and decoding); ``pipe.transformer`` and ``pipe.scheduler`` are the diffusers components.
    """

    def __init__(self, transformer: torch.nn.Module, scheduler: Any) -> None:
        super().__init__()
        self.register_modules(transformer=transformer, scheduler=scheduler)
        self.adapter: ModelAdapter | None = None

    @classmethod
    def of(cls, adapter: ModelAdapter) -> QexportPipeline:
        """The pipeline over a model adapter's transformer, scheduler and conditioner."""
        kind = QexportLabelPipeline if adapter.conditioner.kind == "label" else QexportPipeline
        pipe = kind(adapter.transformer, adapter.make_scheduler())
        pipe.adapter = adapter
        return pipe

    @property
    def model(self) -> ModelAdapter:
        if self.adapter is None:
            raise QexportError(f"{type(self).__name__} has no model; build it with {type(self).__name__}.of(adapter)")
        return self.adapter

    def denoise(
        self,
        cond: torch.Tensor,
        num_inference_steps: int,
        guidance_scale: float,
        latents: torch.Tensor | None,
        generator: torch.Generator | None,
        output_type: str,
    ) -> ImagePipelineOutput:
        """The loop: each step one transformer call on [x, x] with [cond, null], guidance, a scheduler step."""
        model = self.model
        if guidance_scale < 0:
            raise QexportError(f"guidance_scale must be >= 0, got {guidance_scale}")
        if output_type not in ("latent", "np"):
            raise QexportError(f"output_type must be 'latent' or 'np', got {output_type!r}")
        device = self.transformer.device
        n = len(cond)
        if latents is None:
            shape = (n, *model.latent_shape)
            latents = torch.randn(shape, generator=generator, dtype=torch.float32)
        if tuple(latents.shape) != (n, *model.latent_shape):
            raise QexportError(f"latents must be {[n, *model.latent_shape]}, got {list(latents.shape)}")
        x = latents.float().to(device)
        both = torch.cat([cond, model.conditioner.null(n)]).to(device)
        denoiser = Denoiser(self.transformer, model.class_name, model.latent_shape[0]).eval()
        self.scheduler.set_timesteps(num_inference_steps)
        with torch.no_grad():
            for t in self.scheduler.timesteps:
                tt = torch.full((2 * n,), int(t), dtype=torch.long, device=device)
                out_c, out_u = denoiser(torch.cat([x, x]), tt, both).float().chunk(2)  # eps or v
                guided = out_u + guidance_scale * (out_c - out_u)
                x = self.scheduler.step(guided, t, x).prev_sample
        final = x.float().cpu()
        images: Any = final if output_type == "latent" else model.decode(final)
        return ImagePipelineOutput(images=images)

    def __call__(
        self,
        prompt: str | list[str] | None = None,
        num_inference_steps: int = 20,
        guidance_scale: float = 7.0,
        generator: torch.Generator | None = None,
        latents: torch.Tensor | None = None,
        prompt_embeds: torch.Tensor | None = None,
        output_type: str = "np",
    ) -> ImagePipelineOutput:
        """Sample one output per prompt (or per row of prompt_embeds: the conditioner's encoding).

        Returns:
            ``images``: final latents [B, ...] for output_type "latent", else uint8 pixels.
        """
        if (prompt is None) == (prompt_embeds is None):
            raise QexportError("give prompt or prompt_embeds, not both or neither")
        cond = prompt_embeds if prompt_embeds is not None else self.model.conditioner.encode(_listed(prompt))
        return self.denoise(cond, num_inference_steps, guidance_scale, latents, generator, output_type)


class QexportLabelPipeline(QexportPipeline):
    """A class-conditional qexport model (DiT): ``pipe(class_labels=["red circle", 3], latents=x)``."""

    @property
    def labels(self) -> dict[str, int]:
        """Class names to ids (diffusers' DiTPipeline has the same attribute)."""
        return {name: i for i, name in enumerate(getattr(self.model.conditioner, "names", []))}

    def __call__(  # type: ignore[override]
        self,
        class_labels: str | int | list[str | int],
        num_inference_steps: int = 20,
        guidance_scale: float = 7.0,
        generator: torch.Generator | None = None,
        latents: torch.Tensor | None = None,
        output_type: str = "np",
    ) -> ImagePipelineOutput:
        """Sample one output per class label (a name or an id; the null class is the last id)."""
        labels = class_labels if isinstance(class_labels, list) else [class_labels]
        cond = self.model.conditioner.encode([str(label) for label in labels])
        return self.denoise(cond, num_inference_steps, guidance_scale, latents, generator, output_type)


def _listed(prompt: str | list[str] | None) -> list[str]:
    return [prompt] if isinstance(prompt, str) else list(prompt or [])


def load_qexport_pipeline(folder: Path) -> QexportPipeline:
    """The pipeline of a folder whose model_index.json names a qexport pipeline class (the built-ins)."""
    from qexport.models.registry import load_folder

    return QexportPipeline.of(load_folder(Path(folder), model_id=f"diffusers:{Path(folder).resolve()}"))
