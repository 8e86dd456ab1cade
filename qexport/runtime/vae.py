"""The VAE decoder at the edge (numpy + onnxruntime): the sampled latents turned into the decoder's
input as the pipeline does it (unpacking, frames, ``/ scaling_factor + shift_factor``), decoded by
the shipped ONNX part, and mapped to pixels as diffusers' postprocessing does (``x / 2 + 0.5``
clipped to [0, 1])."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort


def decoder_input(latents: np.ndarray, spec: dict[str, Any]) -> np.ndarray:
    """[1, ...] sampled latents -> the decoder's input [N, C, h, w] (N: the frames of a video)."""
    x = np.asarray(latents, dtype=np.float32)
    if spec["layout"] == "packed":  # [B, (h/2)(w/2), 4C] -> [B, C, h, w]
        b, _, channels = x.shape
        h, w = spec["height"], spec["width"]
        x = x.reshape(b, h // 2, w // 2, channels // 4, 2, 2).transpose(0, 3, 1, 4, 2, 5)
        x = x.reshape(b, channels // 4, h, w)
    elif spec["layout"] == "frames":  # [B, C, F, h, w] -> [B*F, C, h, w]
        x = np.moveaxis(x, 2, 1).reshape(-1, x.shape[1], *x.shape[3:])
    return (x / np.float32(spec["scaling_factor"]) + np.float32(spec["shift_factor"])).astype(np.float32)


class VaeDecoder:
    """The shipped decoder of one build (its manifest entry, written by exporter.vae)."""

    def __init__(self, folder: Path, spec: dict[str, Any], options: ort.SessionOptions | None = None) -> None:
        self.spec = spec
        self.session = ort.InferenceSession(str(Path(folder) / spec["model"]), options,
                                            providers=["CPUExecutionProvider"])  # fmt: skip

    def images(self, latents: np.ndarray) -> np.ndarray:
        """Decoded images in [0, 1], [N, h, w, 3] float32 (N: 1, or the frames of a video)."""
        decoded = self.session.run(None, {"z": decoder_input(latents, self.spec)})[0]
        return np.clip(decoded / np.float32(2) + np.float32(0.5), 0, 1).transpose(0, 2, 3, 1)
