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
from qexport.runtime.files import model_path, open_session, run_session
from qexport.runtime.loop import session_options
from qexport.runtime.scheduler import EdgeScheduler
from qexport.runtime.text import TextPart
from qexport.runtime.vae import VaeDecoder

TEXT_KEYS = {"mask": "attention_mask"}  # a binding's output name -> TextPart.encode's key
Denoise = Callable[[int, dict[str, np.ndarray]], np.ndarray]  # (step, feeds by input name) -> output


def text_output(outputs: dict[str, np.ndarray], name: str) -> np.ndarray:
    """A binding's text output from a part's encoded outputs (TextPart.encode): `<output>:zeroed` is
    the output with its padding positions zeroed (times the attention mask).

    Raises:
        QexportError: a name the part does not give.
    """
    if name in outputs:
        return outputs[name]
    if name.endswith(":zeroed") and name.removesuffix(":zeroed") in outputs:
        return outputs[name.removesuffix(":zeroed")] * outputs["attention_mask"][..., None]
    if TEXT_KEYS.get(name) in outputs:
        return outputs[TEXT_KEYS[name]]
    raise QexportError(f"the manifest binds text output {name[:80]!r}, which its text part does not give; rebuild")


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
            self._session = (name, open_session(model_path(self.folder, name), self.options))
        return self._session[1]

    def run_model(self, step: int, feeds: dict[str, np.ndarray]) -> np.ndarray:
        """The shipped denoiser of a step on feeds (the inputs it does not take, e.g. a fixed
        timestep, left out)."""
        session = self.session(step)
        names = {i.name for i in session.get_inputs()}
        return run_session(session, {k: v for k, v in feeds.items() if k in names}, self.model_file(step))[0]

    def _feeds(
        self, inputs: list[dict[str, Any]], seen: np.ndarray, t: float, text: dict[str, Any], ids: dict[str, int]
    ) -> dict[str, Any]:
        """The transformer's inputs of one call by the manifest's bindings.

        Raises:
            QexportError: a binding whose numbers do not fit the values it combines.
        """
        feeds = {}
        for spec in inputs:
            try:
                value = self._bound(spec, seen, t, text, ids)
            except ValueError as exc:  # numpy's concatenate / reshape / pad of shapes the manifest gives
                raise QexportError(f"the manifest's binding of transformer input {spec['name']!r} does not fit "
                                   f"its values ({exc}); rebuild the folder") from None  # fmt: skip
            if value is not None:
                feeds[spec["name"]] = value.astype(np.dtype(spec["dtype"]))
        return feeds

    @staticmethod
    def _bound(
        spec: dict[str, Any], seen: np.ndarray, t: float, text: dict[str, Any], ids: dict[str, int]
    ) -> np.ndarray | None:
        """One binding's value (None: a constant inside the model)."""
        if spec["source"] == "latents":
            return np.concatenate([seen] * spec["repeat"])
        if spec["source"] == "timestep":
            return np.full(spec["shape"], t * spec["factor"])
        if spec["source"] in ("text", "mask"):
            sides = text[spec["part"]]
            return np.concatenate([text_output(sides[side], spec["output"]) for side in spec["order"].split(",")])
        if spec["source"] == "joined":
            return np.concatenate([joined_value(spec["join"], {p: s[side] for p, s in text.items()})
                                   for side in spec["order"].split(",")])  # fmt: skip
        if spec["source"] == "label":
            return label_value(spec, ids)
        return None  # constants are inside the model

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
            try:
                x = sampler.step(i, x, self.guided(outs, x.shape))
            except ValueError as exc:  # numpy: outputs whose shapes the manifest's rule does not fit
                raise QexportError(f"the transformer's outputs at step {i} do not combine as the manifest says "
                                   f"({exc}); rebuild the folder") from None  # fmt: skip
        return x, None if self.vae is None or not decode else self.vae.images(x)

    def guided(self, outs: list[np.ndarray], shape: tuple[int, ...]) -> np.ndarray:
        """The scheduler's model output from one step's transformer outputs: joined, split, CFG.

        Raises:
            ValueError: outputs that do not combine to `shape` as the manifest's rule says.
        """
        joined = np.concatenate(outs)
        if self.spec["split"]:
            joined = joined[:, : self.spec["split"]]
        if self.spec["cfg"] != "none":
            u, c = np.split(joined, 2)
            u, c = (u, c) if self.spec["cfg"] == "uncond,cond" else (c, u)
            joined = u + np.float32(self.spec["guidance"]) * (c - u)
        if joined.shape != shape:
            raise ValueError(f"the model output is {list(joined.shape)}, the sample {list(shape)}")
        return joined.astype(np.float32)
