"""The VAE decoder at the edge (numpy + onnxruntime): the sampled latents turned into the decoder's
input as the pipeline does it (unpacking, frames, per-channel ``latents_mean`` / ``latents_std``,
``/ scaling_factor + shift_factor``), decoded by the shipped ONNX part, and mapped to pixels as
diffusers' postprocessing does (``x / 2 + 0.5`` clipped to [0, 1]); a video comes out as its frames."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from qexport.errors import QexportError
from qexport.runtime.files import model_path, open_session, run_session


def _arranged(x: np.ndarray, spec: dict[str, Any]) -> np.ndarray:
    """The latents' axes as the decoder takes them: [N, C, h, w] images or one [1, C, F, h, w] clip."""
    layout = spec["layout"]
    if layout == "packed":  # [B, (h/2)(w/2), 4C] -> [B, C, h, w]
        b, _, channels = x.shape
        h, w = spec["height"], spec["width"]
        x = x.reshape(b, h // 2, w // 2, channels // 4, 2, 2).transpose(0, 3, 1, 4, 2, 5)
        return x.reshape(b, channels // 4, h, w)
    if layout == "frames":  # [B, C, F, h, w] -> [B*F, C, h, w]
        return np.moveaxis(x, 2, 1).reshape(-1, x.shape[1], *x.shape[3:])
    if layout == "video_frames_first":  # [B, F, C, h, w] -> [B, C, F, h, w]
        return x.transpose(0, 2, 1, 3, 4)
    if layout == "video_packed":  # [B, F·h·w, C·pt·p·p] -> [B, C, F·pt, h·p, w·p], as LTX's _unpack_latents
        (f, h, w), p, pt = spec["grid"], spec["patch_size"], spec["patch_size_t"]
        x = x.reshape(x.shape[0], f, h, w, -1, pt, p, p).transpose(0, 4, 1, 5, 2, 6, 3, 7)
        return x.reshape(x.shape[0], -1, f * pt, h * p, w * p)
    return x  # "image" [B, C, h, w], "video" [B, C, F, h, w]


def decoder_input(latents: np.ndarray, spec: dict[str, Any]) -> np.ndarray:
    """[1, ...] sampled latents -> the decoder's input: [N, C, h, w] images (N: the frames of a
    video decoded frame by frame) or one [1, C, F, h, w] clip for a video VAE."""
    x = _arranged(np.asarray(latents, dtype=np.float32), spec)
    channel = (1, -1) + (1,) * (x.ndim - 2)  # per-channel numbers broadcast over [N, C, ...]
    if "latents_std" in spec:
        x = x * np.asarray(spec["latents_std"], dtype=np.float32).reshape(channel)
    x = x / np.float32(spec["scaling_factor"]) + np.float32(spec["shift_factor"])
    if "latents_mean" in spec:
        x = x + np.asarray(spec["latents_mean"], dtype=np.float32).reshape(channel)
    return x.astype(np.float32)


class VaeDecoder:
    """The shipped decoder of one build (its manifest entry, written by exporter.vae)."""

    def __init__(self, folder: Path, spec: dict[str, Any], options: ort.SessionOptions | None = None) -> None:
        self.spec = spec
        self.session = open_session(model_path(folder, spec["model"]), options)

    def images(self, latents: np.ndarray) -> np.ndarray:
        """Decoded images in [0, 1], [N, h, w, 3] float32 (N: 1, or the frames of a video).

        Raises:
            QexportError: the manifest's VAE entry does not fit the latents, or the decoder refuses them.
        """
        try:
            z = decoder_input(latents, self.spec)
        except ValueError as exc:  # numpy's reshape / broadcast of numbers the manifest gives
            raise QexportError(f"the manifest's VAE entry ({self.spec['layout']}) does not fit latents "
                               f"{list(np.shape(latents))} ({exc}); rebuild the folder") from None  # fmt: skip
        decoded = run_session(self.session, {"z": z}, self.spec["model"])[0]
        if decoded.ndim == 5:  # a clip [B, 3, F, H, W] -> its frames [B*F, 3, H, W]
            decoded = decoded.transpose(0, 2, 1, 3, 4).reshape(-1, decoded.shape[1], *decoded.shape[3:])
        return np.clip(decoded / np.float32(2) + np.float32(0.5), 0, 1).transpose(0, 2, 3, 1)
