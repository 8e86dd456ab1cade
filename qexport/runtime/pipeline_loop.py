"""The edge loop of a pipeline build (exporter.pipeline_parts, exporter.pipeline_build): prompt and
negative prompt through the shipped text parts (or a class label as its id and the null class),
each step's transformer inputs assembled from the manifest's bindings, the learned-sigma split and
classifier-free guidance, the scheduler block's step, and the VAE decoder. The denoiser is one FP
model for every step, or each step's quantized model (the manifest's steps name them; their
timestep is fixed inside, so it is not fed). numpy + onnxruntime + tokenizers."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from qexport.errors import QexportError
from qexport.runtime.loop import session_options
from qexport.runtime.scheduler import EdgeScheduler
from qexport.runtime.text import TextPart
from qexport.runtime.vae import VaeDecoder

TEXT_KEYS = {"mask": "attention_mask"}  # a binding's output name -> TextPart.encode's key
Denoise = Callable[[int, dict[str, np.ndarray]], np.ndarray]  # (step, feeds by input name) -> output


def text_output(outputs: dict[str, np.ndarray], name: str) -> np.ndarray:
    """A binding's text output from a part's encoded outputs (TextPart.encode): `<output>:zeroed` is
    the output with its padding positions zeroed (times the attention mask)."""
    if name in outputs:
        return outputs[name]
    if name.endswith(":zeroed"):
        return outputs[name.removesuffix(":zeroed")] * outputs["attention_mask"][..., None]
    return outputs[TEXT_KEYS[name]]


def joined_value(join: dict[str, Any], outputs: dict[str, dict[str, np.ndarray]]) -> np.ndarray:
    """One side of a ``joined`` binding from each part's outputs for that side: its pieces (text
    outputs or joins) concatenated on `axis`, the last axis then zero-padded to `width` where one is
    given (SD3: the two CLIPs side by side, padded to T5's width, then T5 after them on the sequence)."""
    if "part" in join:
        return text_output(outputs[join["part"]], join["output"])
    value = np.concatenate([joined_value(p, outputs) for p in join["pieces"]], axis=join["axis"])
    pad = join.get("width", value.shape[-1]) - value.shape[-1]
    return np.pad(value, [(0, 0)] * (value.ndim - 1) + [(0, pad)]) if pad else value


def label_id(labels: dict[str, Any], label: str | int) -> int:
    """The class id of a label: a name of the build's id2label, or a class id.

    Raises:
        QexportError: a label that is neither, naming the choices.
    """
    names, classes = labels["names"], int(labels["classes"])
    if isinstance(label, str) and label in names:
        return int(names[label])
    text = str(label).strip()
    if text.isdigit() and int(text) < classes:
        return int(text)
    known = f"one of {', '.join(list(names)[:8])}{' ...' if len(names) > 8 else ''}, or " if names else ""
    raise QexportError(f"class label {label!r} is not known to this build; give {known}a class id in 0..{classes - 1}")


def label_value(spec: dict[str, Any], ids: dict[str, int]) -> np.ndarray:
    """A ``label`` binding: the class ids by side (``{"cond": id, "uncond": null}``) in its order."""
    return np.array([ids[side] for side in spec["order"].split(",")], dtype=np.int64).reshape(spec["shape"])


class PipelineLoop:
    def __init__(self, folder: Path, manifest: dict[str, Any], threads: int | None = None) -> None:
        self.folder, self.manifest, self.spec = Path(folder), manifest, manifest["pipeline"]
        self.options = session_options(threads)
        self.texts = {t["name"]: TextPart(self.folder, t, self.options) for t in self.spec["text"]}
        self.vae = VaeDecoder(self.folder, self.spec["vae"], self.options) if self.spec.get("vae") else None
        self._session: tuple[str, ort.InferenceSession] | None = None  # the last step's model, kept while it repeats

    def model_file(self, step: int) -> str:
        """The denoiser of a step: the FP build's one model, or the step's own."""
        return self.spec.get("denoiser") or self.manifest["steps"][step]["model"]

    def session(self, step: int) -> ort.InferenceSession:
        name = self.model_file(step)
        if self._session is None or self._session[0] != name:
            self._session = (name, ort.InferenceSession(str(self.folder / name), self.options,
                                                        providers=["CPUExecutionProvider"]))  # fmt: skip
        return self._session[1]

    def run_model(self, step: int, feeds: dict[str, np.ndarray]) -> np.ndarray:
        """The shipped denoiser of a step on feeds (the inputs it does not take, e.g. a fixed
        timestep, left out)."""
        session = self.session(step)
        names = {i.name for i in session.get_inputs()}
        return session.run(None, {k: v for k, v in feeds.items() if k in names})[0]

    def _feeds(
        self, inputs: list[dict[str, Any]], seen: np.ndarray, t: float, text: dict[str, Any], ids: dict[str, int]
    ) -> dict[str, Any]:
        feeds = {}
        for spec in inputs:
            dtype = np.dtype(spec["dtype"])
            if spec["source"] == "latents":
                value = np.concatenate([seen] * spec["repeat"])
            elif spec["source"] == "timestep":
                value = np.full(spec["shape"], t * spec["factor"])
            elif spec["source"] in ("text", "mask"):
                sides = text[spec["part"]]
                value = np.concatenate([text_output(sides[side], spec["output"]) for side in spec["order"].split(",")])
            elif spec["source"] == "joined":
                value = np.concatenate([joined_value(spec["join"], {p: s[side] for p, s in text.items()})
                                        for side in spec["order"].split(",")])  # fmt: skip
            elif spec["source"] == "label":
                value = label_value(spec, ids)
            else:
                continue  # constants are inside the model
            feeds[spec["name"]] = value.astype(dtype)
        return feeds

    def run(
        self, condition: str | int, start: np.ndarray, denoise: Denoise | None = None, decode: bool = True
    ) -> tuple[np.ndarray, np.ndarray | None]:
        """(final latents, decoded images in [0, 1] or None: no VAE, or `decode` off) from the first
        sample `start` [1, ...].
        `condition` is the prompt, or for a class-conditional build a class id or a name of its
        id2label. `denoise` replaces the shipped denoiser (verification runs the torch model through
        the same loop).

        Raises:
            QexportError: a condition the build does not take (a class label it does not know).
        """
        denoise = denoise or self.run_model
        labels = self.spec.get("labels")
        ids = {} if labels is None else {"cond": label_id(labels, condition), "uncond": int(labels["null"])}
        if labels is None and not isinstance(condition, str):
            raise QexportError(f"this build takes a caption, not class {condition!r}")
        text = {name: {"cond": part.encode(str(condition)), "uncond": part.encode(self.spec["negative_prompt"])}
                for name, part in self.texts.items()}  # fmt: skip
        sampler = EdgeScheduler(self.manifest["scheduler"], seed=0)
        x = start.astype(np.float32)
        for i, step in enumerate(self.manifest["scheduler"]["steps"]):
            seen = sampler.model_input(i, x)
            outs = [denoise(i, self._feeds(c["inputs"], seen, step["timestep"], text, ids)) for c in self.spec["calls"]]
            joined = np.concatenate(outs)
            if self.spec["split"]:
                joined = joined[:, : self.spec["split"]]
            if self.spec["cfg"] != "none":
                u, c = np.split(joined, 2)
                u, c = (u, c) if self.spec["cfg"] == "uncond,cond" else (c, u)
                joined = u + np.float32(self.spec["guidance"]) * (c - u)
            x = sampler.step(i, x, joined.astype(np.float32))
        return x, None if self.vae is None or not decode else self.vae.images(x)
