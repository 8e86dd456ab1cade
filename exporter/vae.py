"""A pipeline's VAE decoder as an ONNX part for the edge, with the numbers that turn the sampled
latents into the decoder's input: the pipelines' own ``latents / scaling_factor + shift_factor``,
Flux's unpacking of 2x2 latent patches, and a video's frames decoded one by one (Latte). FP32,
exported once; the image VAE (AutoencoderKL) of DiT, PixArt-α/Σ, Latte, SD3 and Flux. The 3-D
video VAEs (Wan, CogVideoX, LTX-Video) are refused by class until they are exported."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import onnx
import torch
from torch import nn

from qexport.errors import QexportError
from qexport.runtime.vae import decoder_input

VAE_OPSET = 17
# pipeline class -> how its sampled latents reach the decoder (the pipelines' own decode code)
LAYOUTS = {
    "DiTPipeline": "image",
    "PixArtAlphaPipeline": "image",
    "PixArtSigmaPipeline": "image",
    "StableDiffusion3Pipeline": "image",
    "FluxPipeline": "packed",  # [B, (h/2)(w/2), 4C] -> [B, C, h, w]
    "LattePipeline": "frames",  # [B, C, F, h, w] -> F images
}


class _Decode(nn.Module):
    def __init__(self, vae: Any) -> None:
        super().__init__()
        self.vae = vae

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.vae.decode(z, return_dict=False)[0]


def vae_supported(pipe: Any) -> str:
    """The pipeline's latent layout for its VAE decoder.

    Raises:
        QexportError: a pipeline or VAE class without a decoding rule here.
    """
    pipeline, vae = type(pipe).__name__, type(pipe.vae).__name__
    layout = LAYOUTS.get(pipeline)
    if layout is None or vae != "AutoencoderKL":
        raise QexportError(
            f"{pipeline} with {vae} has no VAE export yet; supported: AutoencoderKL in {', '.join(LAYOUTS)}"
        )
    return layout


@torch.no_grad()
def export_vae_decoder(pipe: Any, latents: torch.Tensor, folder: Path) -> dict[str, Any]:
    """Write vae_decoder.onnx for the latents the pipeline samples (one sample, as the pipeline's
    scheduler leaves them); returns the manifest entry.

    Raises:
        QexportError: a pipeline or VAE class without a decoding rule here.
    """
    layout, vae = vae_supported(pipe), pipe.vae
    pipeline, config = type(pipe).__name__, vae.config
    spec: dict[str, Any] = {
        "model": "vae_decoder.onnx",
        "class": type(vae).__name__,
        "layout": layout,
        "scaling_factor": float(config.scaling_factor),
        "shift_factor": float(config.get("shift_factor") or 0.0),
        "latents": list(latents.shape[1:]),
    }
    if layout == "packed":
        side = round(latents.shape[1] ** 0.5)
        if side * side != latents.shape[1]:
            raise QexportError(f"{pipeline}'s packed latents {list(latents.shape)} are not square; not supported yet")
        spec.update(height=2 * side, width=2 * side)
    z = decoder_input(latents[:1].numpy(), spec)
    torch.onnx.export(_Decode(vae).eval(), (torch.from_numpy(z[:1]),), str(folder / spec["model"]), dynamo=False,
                      opset_version=VAE_OPSET, input_names=["z"], output_names=["image"],
                      dynamic_axes={"z": {0: "images"}, "image": {0: "images"}})  # fmt: skip
    onnx.checker.check_model(str(folder / spec["model"]))
    return spec
