"""A pipeline's VAE decoder as an ONNX part for the edge (FP32 computation, its weights stored as the
recipe's ``parts.precision`` says), with the numbers that turn the sampled latents into the decoder's
input as the pipeline's own decode code does: the image VAE of DiT, PixArt-α/Σ, Latte (frame by
frame), SD3 and Flux, and the 3-D video VAEs of Wan 2.1, CogVideoX and LTX-Video (the whole clip
decoded at once, static shapes). Other VAE classes are refused by class."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from qexport.exporter.part_precision import export_part
from torch import nn

from qexport.errors import QexportError
from qexport.recipe import PartPrecision
from qexport.runtime.vae import decoder_input

VAE_OPSET = 17
GRID_KEYS = ("num_frames", "height", "width")  # LTX's transformer keywords for the latent grid


@dataclass(frozen=True, kw_only=True)
class Decoding:
    """How one pipeline class turns its sampled latents into its VAE decoder's input."""

    vae: str  # the VAE class it decodes with
    layout: str  # how the latents' axes reach the decoder (runtime.vae.decoder_input)
    scaled: bool = True  # divided by vae.config.scaling_factor (plus shift_factor, if any)
    stats: str = ""  # per-channel latents_mean / latents_std: "config" (Wan's), "buffers" (LTX's)
    unset: tuple[tuple[str, str], ...] = ()  # ("component.config_key", why it must be unset)


AUTOENCODER_KL = "AutoencoderKL"
# pipeline class -> its decoding (read from each pipeline's own decode code)
DECODINGS = {
    "DiTPipeline": Decoding(vae=AUTOENCODER_KL, layout="image"),
    "PixArtAlphaPipeline": Decoding(vae=AUTOENCODER_KL, layout="image"),
    "PixArtSigmaPipeline": Decoding(vae=AUTOENCODER_KL, layout="image"),
    "StableDiffusion3Pipeline": Decoding(vae=AUTOENCODER_KL, layout="image"),
    "FluxPipeline": Decoding(vae=AUTOENCODER_KL, layout="packed"),  # [B, (h/2)(w/2), 4C] -> [B, C, h, w]
    "LattePipeline": Decoding(vae=AUTOENCODER_KL, layout="frames"),  # [B, C, F, h, w] -> F images
    "WanPipeline": Decoding(vae="AutoencoderKLWan", layout="video", scaled=False, stats="config"),
    "CogVideoXPipeline": Decoding(
        vae="AutoencoderKLCogVideoX",
        layout="video_frames_first",  # [B, F, C, h, w] -> [B, C, F, h, w]
        unset=(("transformer.patch_size_t", "the pipeline drops padding frames that depend on the call's num_frames"),),
    ),
    "LTXPipeline": Decoding(
        vae="AutoencoderKLLTXVideo",
        layout="video_packed",  # [B, F·h·w, C·pt·p·p] -> [B, C, F·pt, h·p, w·p]
        stats="buffers",
        unset=(("vae.timestep_conditioning", "the pipeline mixes noise from its torch generator into the latents"),),
    ),
}


class _Decode(nn.Module):
    def __init__(self, vae: Any) -> None:
        super().__init__()
        self.vae = vae

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.vae.decode(z, return_dict=False)[0]


def vae_supported(pipe: Any) -> Decoding:
    """The pipeline's decoding rule for its VAE.

    Raises:
        QexportError: a pipeline or VAE class without a decoding rule here, or a config key set whose
            decoding needs more than the sampled latents.
    """
    pipeline, vae = type(pipe).__name__, type(pipe.vae).__name__
    decoding = DECODINGS.get(pipeline)
    if decoding is None or vae != decoding.vae:
        classes = {d.vae: [p for p, e in DECODINGS.items() if e.vae == d.vae] for d in DECODINGS.values()}
        rules = "; ".join(f"{v} in {', '.join(ps)}" for v, ps in classes.items())
        raise QexportError(f"{pipeline} with {vae} has no VAE export yet; supported: {rules}")
    for key, why in decoding.unset:
        component, _, name = key.partition(".")
        value = getattr(pipe, component).config.get(name)
        if value:
            raise QexportError(
                f"{pipeline}'s {component} sets {name}={value!r} ({why}); only a {component} without {name} is exported"
            )
    return decoding


def latent_grid(values: dict[str, Any]) -> tuple[int, int, int] | None:
    """The latent (frames, height, width) a transformer call names by keyword (LTX's), if it does."""
    if not all(k in values for k in GRID_KEYS):
        return None
    frames, height, width = (int(values[k]) for k in GRID_KEYS)
    return frames, height, width


def _spec(pipe: Any, decoding: Decoding, latents: torch.Tensor, grid: Sequence[int] | None) -> dict[str, Any]:
    """The manifest entry: every number decoder_input needs, as JSON-able data."""
    vae, pipeline, config = pipe.vae, type(pipe).__name__, pipe.vae.config
    spec: dict[str, Any] = {
        "model": "vae_decoder.onnx",
        "class": type(vae).__name__,
        "layout": decoding.layout,
        "scaling_factor": float(config.scaling_factor) if decoding.scaled else 1.0,
        "shift_factor": float(config.get("shift_factor") or 0.0) if decoding.scaled else 0.0,
        "latents": list(latents.shape[1:]),
    }
    if decoding.stats:
        source = config if decoding.stats == "config" else vae
        stats = {k: getattr(source, k, None) for k in ("latents_mean", "latents_std")}
        if any(v is None for v in stats.values()):
            missing = [k for k, v in stats.items() if v is None]
            raise QexportError(f"{pipeline}'s {spec['class']} has no {' / '.join(missing)} in its {decoding.stats}")
        spec.update({k: torch.as_tensor(v, dtype=torch.float32).tolist() for k, v in stats.items()})
    if decoding.layout == "packed":
        side = round(latents.shape[1] ** 0.5)
        if side * side != latents.shape[1]:
            raise QexportError(f"{pipeline}'s packed latents {list(latents.shape)} are not square; not supported yet")
        spec.update(height=2 * side, width=2 * side)
    if decoding.layout == "video_packed":
        if grid is None or len(grid) != 3:
            raise QexportError(
                f"{pipeline}'s packed latents {list(latents.shape)} need their latent grid (frames, height, width): "
                f"pass grid, e.g. latent_grid() of a transformer call's {', '.join(GRID_KEYS)}"
            )
        transformer = pipe.transformer.config
        spec.update(grid=[int(n) for n in grid], patch_size=int(transformer.patch_size),
                    patch_size_t=int(transformer.patch_size_t))  # fmt: skip
    return spec


@contextmanager
def _whole(vae: Any) -> Iterator[None]:
    """The VAE decoding the whole input at once: tiling, slicing and frame-wise decoding off."""
    flags = {k: getattr(vae, k) for k in ("use_tiling", "use_slicing", "use_framewise_decoding") if hasattr(vae, k)}
    for k in flags:
        setattr(vae, k, False)
    try:
        yield
    finally:
        for k, v in flags.items():
            setattr(vae, k, v)


@torch.no_grad()
def export_vae_decoder(
    pipe: Any,
    latents: torch.Tensor,
    folder: Path,
    grid: Sequence[int] | None = None,
    precision: PartPrecision = PartPrecision.FP16,
) -> dict[str, Any]:
    """Write vae_decoder.onnx for the latents the pipeline samples (one sample, as the pipeline's
    scheduler leaves them); returns the manifest entry.

    Args:
        pipe: the diffusers pipeline.
        latents: its scheduler's last sample, [1, ...].
        folder: where vae_decoder.onnx is written.
        grid: the latent (frames, height, width) of packed video latents (LTX); see latent_grid.
        precision: how its weights are stored (exporter.part_precision; FP32 computation in all).

    Raises:
        QexportError: a pipeline or VAE class without a decoding rule here, a config it cannot
            decode from the latents alone, or packed video latents without their grid.
    """
    decoding, vae = vae_supported(pipe), pipe.vae
    spec = _spec(pipe, decoding, latents, grid)
    z = torch.from_numpy(decoder_input(latents[:1].numpy(), spec))
    video = z.ndim == 5  # one clip [1, C, F, h, w], static; images [N, C, h, w] with N free

    def write(to: Path) -> None:
        torch.onnx.export(_Decode(vae).eval(), (z,), str(to), dynamo=False, opset_version=VAE_OPSET,
                          input_names=["z"], output_names=["video" if video else "image"],
                          dynamic_axes=None if video else {"z": {0: "images"}, "image": {0: "images"}})  # fmt: skip

    with _whole(vae), _symbolics():
        stored = export_part(write, Path(folder) / spec["model"], precision)
    return {**spec, **stored}


def _nearest_exact(g: Any, x: Any, output_size: Any, scales: Any) -> Any:
    """aten::_upsample_nearest_exact2d (Wan's VAE) for the TorchScript exporter, which has none:
    Resize, nearest, source pixel floor((i + 0.5) / scale) = half_pixel rounded up at halves."""
    from torch.onnx import symbolic_helper as sh

    out = sh._interpolate_helper("upsample_nearest_exact2d", 4, "nearest")(g, x, output_size, scales)
    out.node().s_("coordinate_transformation_mode", "half_pixel")
    out.node().s_("nearest_mode", "round_prefer_ceil")
    return out


def _movedim(g: Any, x: Any, source: Any, destination: Any) -> Any:
    """aten::movedim with negative axes (LTX's ``movedim(-1, 1)``), which the TorchScript exporter
    writes as a Transpose with a negative, invalid permutation."""
    from torch.onnx import symbolic_helper as sh

    rank = sh._get_tensor_rank(x)
    if rank is None:
        raise QexportError("movedim of a tensor of unknown rank in the VAE decoder; cannot export it")
    moved = {
        int(d) % rank: int(s) % rank
        for s, d in zip(
            sh._maybe_get_const(source, "t").reshape(-1).tolist(),
            sh._maybe_get_const(destination, "t").reshape(-1).tolist(),
            strict=True,
        )
    }
    rest = iter(d for d in range(rank) if d not in moved.values())
    return g.op("Transpose", x, perm_i=[moved[d] if d in moved else next(rest) for d in range(rank)])


@contextmanager
def _symbolics() -> Iterator[None]:
    """The two symbolics above, registered for the VAE export only."""
    ops = {"aten::_upsample_nearest_exact2d": _nearest_exact, "aten::movedim": _movedim}
    for name, fn in ops.items():
        torch.onnx.register_custom_op_symbolic(name, fn, VAE_OPSET)
    try:
        yield
    finally:
        for name in ops:
            torch.onnx.unregister_custom_op_symbolic(name, VAE_OPSET)
