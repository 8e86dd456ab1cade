"""The edge loop of a pipeline build (exporter.pipeline_parts): prompt and negative prompt through
the shipped text parts, each step's transformer inputs assembled from the manifest's bindings,
the learned-sigma split and classifier-free guidance, the scheduler block's step, and the VAE
decoder. numpy + onnxruntime + tokenizers."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from qexport.runtime.loop import session_options
from qexport.runtime.scheduler import EdgeScheduler
from qexport.runtime.text import TextPart
from qexport.runtime.vae import VaeDecoder

TEXT_KEYS = {"mask": "attention_mask"}  # a binding's output name -> TextPart.encode's key


class PipelineLoop:
    def __init__(self, folder: Path, manifest: dict[str, Any], threads: int | None = None) -> None:
        self.folder, self.manifest, self.spec = Path(folder), manifest, manifest["pipeline"]
        options = session_options(threads)
        self.texts = {t["name"]: TextPart(self.folder, t, options) for t in self.spec["text"]}
        self.session = ort.InferenceSession(str(self.folder / self.spec["denoiser"]), options,
                                            providers=["CPUExecutionProvider"])  # fmt: skip
        self.vae = VaeDecoder(self.folder, self.spec["vae"], options) if self.spec.get("vae") else None

    def _feeds(self, inputs: list[dict[str, Any]], seen: np.ndarray, t: float, text: dict[str, Any]) -> dict[str, Any]:
        feeds = {}
        for spec in inputs:
            dtype = np.dtype(spec["dtype"])
            if spec["source"] == "latents":
                value = np.concatenate([seen] * spec["repeat"])
            elif spec["source"] == "timestep":
                value = np.full(spec["shape"], t * spec["factor"])
            elif spec["source"] in ("text", "mask"):
                sides = text[spec["part"]]
                key = TEXT_KEYS.get(spec["output"], spec["output"])
                value = np.concatenate([sides[side][key] for side in spec["order"].split(",")])
            else:
                continue  # constants are inside the model
            feeds[spec["name"]] = value.astype(dtype)
        return feeds

    def run(self, prompt: str, start: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """(final latents, decoded images in [0, 1] or None) from the first sample `start` [1, ...]."""
        text = {name: {"cond": part.encode(prompt), "uncond": part.encode(self.spec["negative_prompt"])}
                for name, part in self.texts.items()}  # fmt: skip
        sampler = EdgeScheduler(self.manifest["scheduler"], seed=0)
        x = start.astype(np.float32)
        for i, step in enumerate(self.manifest["scheduler"]["steps"]):
            seen = sampler.model_input(i, x)
            outs = [self.session.run(None, self._feeds(c["inputs"], seen, step["timestep"], text))[0]
                    for c in self.spec["calls"]]  # fmt: skip
            joined = np.concatenate(outs)
            if self.spec["split"]:
                joined = joined[:, : self.spec["split"]]
            if self.spec["cfg"] != "none":
                u, c = np.split(joined, 2)
                u, c = (u, c) if self.spec["cfg"] == "uncond,cond" else (c, u)
                joined = u + np.float32(self.spec["guidance"]) * (c - u)
            x = sampler.step(i, x, joined.astype(np.float32))
        return x, None if self.vae is None else self.vae.images(x)
