"""A real pipeline's denoiser as an ONNX part, bound to what feeds it at the edge. From a traced run
of the pipeline's own ``__call__``, every keyword input of its transformer is traced back to one
source, by value:

- ``latents``: the scheduler's sample times the step's input scale (repeated for a CFG batch);
- ``timestep``: the step's timestep times a fixed factor (Flux feeds t / 1000);
- ``text``: an output of one shipped text part (exporter.text_encoders) for the prompt and the
  negative prompt, in the order the pipeline batches them (as called with the mask, without it, or
  zeroed past the prompt's tokens); ``mask``: that part's attention mask;
- ``joined``: text outputs of several parts concatenated on one axis, then zero-padded to a width,
  nested (SD3: its CLIPs side by side, padded to T5's width, then T5 on the sequence);
- ``label``: a class-conditional pipeline's (DiT's) class id for the cond side and its null class for
  the uncond side, in the order the pipeline batches them;
- ``constant``: the same value at every step (position ids, Flux's guidance, PixArt's size
  conditions), stored with the build.

An input that matches none is refused by name. The model output the scheduler got is then
reproduced from the transformer's output (the learned-sigma half dropped where the output has twice
the sample's channels, classifier-free guidance as ``u + g·(c − u)``) and checked. A pipeline that
steps its scheduler on the whole CFG batch (DiT: equal halves) is read as one sample whose model
input is repeated. The part is exported in FP32 with one timestep input (one model for every step)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from qexport.exporter.denoiser_export import export_denoiser
from qexport.exporter.pipeline_text import ORDERS, Texts, joined_source, same, text_inputs, text_source
from qexport.exporter.text_encoders import TextPart

from qexport.errors import QexportError
from qexport.media import written_whole
from qexport.models.pipeline import Trace, TransformerCall, call_default, call_parameters, length_fixes
from qexport.recipe import PartPrecision
from qexport.runtime.pipeline_loop import label_value

OTHER_PROMPT = "a second, different caption"  # traced too: what depends on the prompt is not a constant
Labels = tuple[dict[str, int], dict[str, int]]  # both traced runs' class ids by side: {"cond": id, "uncond": null}


def _label_source(value: np.ndarray, there: np.ndarray, labels: Labels | None) -> dict[str, Any] | None:
    """Both traced runs' class ids (`value` in this one, `there` in the other) in one CFG order."""
    if labels is None or value.ndim != 1 or value.dtype.kind not in "iu":
        return None
    for order in ORDERS:
        spec = {"order": order, "shape": list(value.shape)}
        if all(np.array_equal(v, label_value(spec, ids)) for v, ids in zip((value, there), labels, strict=True)):
            return {"source": "label", "order": order}
    return None


def bind_inputs(
    trace: Trace, block: dict[str, Any], texts: Texts, other: Trace, labels: Labels | None = None
) -> list[dict[str, Any]]:
    """Per transformer call of a step, its inputs' sources (see the module doc). `other` is a trace
    of the same call with another prompt (or class): a constant must be the same there too (else it
    depends on the prompt in a way no text part reproduces); `labels` are both runs' class ids.

    Raises:
        QexportError: an input that matches no source, or calls whose layout changes between steps.
    """
    first = [c for c in trace.calls if c.step == 0]
    second = [c for c in trace.calls if c.step == 1]
    elsewhere = [c for c in other.calls if c.step == 0]
    if len(second) != len(first):
        raise QexportError(f"{trace.pipeline} calls its transformer {len(first)} then {len(second)} times per step")
    layouts = []
    x = trace.samples[0] * block["steps"][0]["input_scale"]  # what the model saw of the first sample
    t0 = block["steps"][0]["timestep"]
    for k, call in enumerate(first):
        later = second[k] if second else None
        layout = []
        for name, value in call.kept.items():
            spec = {"name": name, "dtype": call.tensors[name].dtype, "shape": list(value.shape)}
            batch = value.shape[0] if value.ndim else 1
            if value.ndim and same(value, np.concatenate([x] * max(batch // len(x), 1))) and batch % len(x) == 0:
                layout.append({**spec, "source": "latents", "repeat": batch // len(x)})
            elif later is not None and _is_timestep(value, later.kept[name], block):
                layout.append({**spec, "source": "timestep", "factor": float(value.flat[0]) / t0})
            elif (found := text_source(value, texts) or joined_source(value, texts)
                   or _label_source(value, elsewhere[k].kept[name], labels)) is not None:  # fmt: skip
                layout.append({**spec, **found})
            elif later is not None and same(value, later.kept[name]) and same(value, elsewhere[k].kept[name]):
                layout.append({**spec, "source": "constant"})
            else:
                raise QexportError(
                    f"{trace.pipeline}'s transformer input {name!r} {list(value.shape)} is none of the latents, the "
                    "timestep, a text part's output or mask, the class label, or a constant; this pipeline needs its "
                    "own binding"
                )
        layouts.append(layout)
    return [
        {"inputs": layout, "values": {k: repr(v) for k, v in call.values.items()}}
        for layout, call in zip(layouts, first, strict=True)
    ]


def check_shapes(trace: Trace, other: Trace, fixes: list[str]) -> None:
    """The transformer's inputs have the same shapes for both prompts (a fixed-shape model can follow
    them); `fixes` are the call arguments that would keep them so.

    Raises:
        QexportError: the first input whose shape changes with the prompt, with the fixes.
    """
    for call, there in zip(*([c for c in t.calls if c.step == 0] for t in (trace, other)), strict=True):
        moved = [n for n, spec in call.tensors.items() if there.tensors.get(n) != spec]
        if moved:
            fix = f"; call it with {' '.join(fixes)}" if fixes else ""
            raise QexportError(
                f"{trace.pipeline}'s transformer input {moved[0]!r} changes shape with the prompt "
                f"({list(call.tensors[moved[0]].shape)} vs {list(there.tensors[moved[0]].shape)}: the pipeline cuts "
                f"its caption embeddings to the prompt's length); a fixed-shape edge model cannot follow it{fix}"
            )


def _is_timestep(v0: np.ndarray, v1: np.ndarray, block: dict[str, Any]) -> bool:
    """One value broadcast over the batch, the same multiple of the block's timestep at steps 0 and 1
    (zero at step 1 where that step's timestep is 0: two DDIM steps with leading spacing end there)."""
    t0, t1 = block["steps"][0]["timestep"], block["steps"][1]["timestep"]
    if not v0.size or v0.ndim > 1 or not t0 or not same(v0, np.full(v0.shape, float(v0.flat[0]))):
        return False
    f0 = float(v0.flat[0]) / t0
    if not t1:
        return bool(f0) and v1.shape == v0.shape and not np.any(v1)
    return abs(float(v1.flat[0]) / t1 - f0) <= 1e-5 * max(abs(f0), 1e-12)


def output_rule(trace: Trace, guidance: float | None) -> dict[str, Any]:
    """How the scheduler's model output comes from the transformer's outputs at a step: the channel
    split and the CFG combination, checked on the first step.

    Raises:
        QexportError: the pipeline's model output is not reproduced.
    """
    calls = [c for c in trace.calls if c.step == 0]
    outs = [c.output for c in calls if c.output is not None]
    if len(outs) != len(calls):
        raise QexportError(f"{trace.pipeline}'s transformer returned no tensor")
    channels = trace.samples[0].shape[1]
    split = channels if outs[0].ndim > 1 and outs[0].shape[1] == 2 * channels else None
    parts = [o[:, :split] if split else o for o in outs]
    joined = np.concatenate(parts)
    want = trace.outputs[0]
    for rule in ("none", "uncond,cond", "cond,uncond"):
        if rule == "none":
            got = joined
        elif len(joined) == 2 * len(want) and guidance is not None:
            u, c = np.split(joined, 2) if rule == "uncond,cond" else np.split(joined, 2)[::-1]
            got = u + guidance * (c - u)
        else:
            continue
        if got.shape == want.shape and same(got, want):
            return {"split": split, "cfg": rule, "guidance": guidance}
    raise QexportError(f"{trace.pipeline}'s model output is not the transformer's output with CFG; not supported yet")


@dataclass(kw_only=True)
class Binding:
    """A pipeline traced and bound for the edge, before anything is written: its traces (the prompt
    and a second one), scheduler block, text parts with their lengths, per-call input layouts and
    output rule."""

    folder: Path
    pipe: Any
    trace: Trace
    block: dict[str, Any]
    parts: list[TextPart]
    lengths: dict[str, int]
    calls: list[dict[str, Any]]
    rule: dict[str, Any]
    negative: str
    labels: dict[str, Any] | None = None  # a class-conditional pipeline's names -> ids, class count, null id

    @property
    def first(self) -> TransformerCall:
        """The transformer's first call (its inputs are the export's example inputs)."""
        return next(c for c in self.trace.calls if c.step == 0)


@torch.no_grad()
def bind_pipeline(folder: Path, prompt: str, steps: int, call: dict[str, Any], device: str = "cpu") -> Binding:
    """Trace the pipeline folder's own __call__ (seed 0) on `device` and bind its transformer's
    inputs (the text parts' values computed there too, so that they match the traced ones); the
    pipeline is back on the CPU afterwards, for the export.

    Raises:
        QexportError: anything of the pipeline that is not bound or not exportable, by name.
    """
    from qexport.exporter.text_encoders import text_parts
    from qexport.exporter.vae import vae_supported

    from qexport.models.pipeline import label_ids, load_pipeline, takes_labels, trace_call
    from qexport.models.scheduler import check, probe

    pipe = load_pipeline(folder).to(device)
    labels = _label_block(pipe) if takes_labels(pipe) else None
    if labels is None and "prompt" not in call_parameters(pipe):
        raise QexportError(f"{type(pipe).__name__} takes neither a prompt nor class labels; not supported")
    vae_supported(pipe)
    negative = call.get("negative_prompt", call_default(pipe, "negative_prompt")) or ""
    guidance = call.get("guidance_scale", call_default(pipe, "guidance_scale"))
    sides: Labels | None = None
    conditions: list[dict[str, Any]]
    if labels is not None:  # the label and another class, each with the null class
        first = label_ids(pipe, [prompt])[0]
        ids = (first, (first + 1) % labels["classes"])
        conditions = [{"class_labels": [i]} for i in ids]
        sides = ({"cond": ids[0], "uncond": labels["null"]}, {"cond": ids[1], "uncond": labels["null"]})
    else:
        conditions = [{"prompt": p} for p in (prompt, OTHER_PROMPT)]
    seed = torch.Generator("cpu").manual_seed
    runs = [_folded(trace_call(pipe, num_inference_steps=steps, output_type="latent", generator=seed(0), **c, **call))
            for c in conditions]  # fmt: skip
    trace = runs[0]
    check_shapes(trace, runs[1], length_fixes(pipe, call))
    block = probe(trace.scheduler, steps, trace.set_timesteps)
    check(trace.scheduler, block)
    parts = text_parts(pipe)
    named = call.get("max_sequence_length", call_default(pipe, "max_sequence_length"))
    lengths, texts = text_inputs(parts, trace, prompt, negative, (named,) if isinstance(named, int) else ())
    calls = bind_inputs(trace, block, texts, runs[1], sides)
    rule = output_rule(trace, guidance)
    pipe.to("cpu")
    return Binding(folder=Path(folder), pipe=pipe, trace=trace, block=block, parts=parts, lengths=lengths,
                   calls=calls, rule=rule, negative=negative, labels=labels)  # fmt: skip


def _label_block(pipe: Any) -> dict[str, Any]:
    """What the edge needs to map a class label to an id: the folder's id2label names -> ids, the
    class count, and the null class (the label embedding's last row, as DiT's; checked by value)."""
    classes = int(getattr(pipe.transformer.config, "num_embeds_ada_norm", 0) or 0)
    if classes < 2:
        raise QexportError(f"{type(pipe).__name__}'s transformer names no class count (num_embeds_ada_norm)")
    return {"names": dict(getattr(pipe, "labels", None) or {}), "classes": classes, "null": classes}


def _folded(trace: Trace) -> Trace:
    """The trace as one sample where the pipeline steps its scheduler on the whole CFG batch (DiT:
    every sample, model output and result a batch of two equal halves); else the trace itself."""
    series = (trace.samples, trace.outputs, trace.results)
    if not all(len(v) % 2 == 0 and same(*np.split(v, 2)) for s in series for v in s):
        return trace
    half = [[v[: len(v) // 2] for v in s] for s in series]
    return dataclasses.replace(trace, samples=half[0], outputs=half[1], results=half[2])


@torch.no_grad()
def write_parts(binding: Binding, folder: Path, precision: PartPrecision = PartPrecision.FP16) -> dict[str, Any]:
    """The text parts and the VAE decoder in `folder`, their weights stored in `precision` (the
    recipe's ``parts.precision``); returns the manifest's pipeline block (its denoiser entry left to
    the caller)."""
    from qexport.exporter.text_encoders import export_text_part
    from qexport.exporter.vae import export_vae_decoder, latent_grid

    b = binding
    text_specs = [export_text_part(p, folder, b.lengths[p.name], precision) for p in b.parts if p.name in b.lengths]
    latents = torch.from_numpy(b.trace.results[-1][:1].astype(np.float32))
    vae = export_vae_decoder(b.pipe, latents, folder, grid=latent_grid(b.first.values), precision=precision)
    labels = {} if b.labels is None else {"labels": b.labels}
    return {"class": b.trace.pipeline, "negative_prompt": b.negative, "calls": b.calls, **b.rule,
            "text": text_specs, **labels, "vae": vae}  # fmt: skip


def release_parts(binding: Binding) -> None:
    """Free the text encoders' and the VAE's weights once write_parts has exported them (each
    module moved to the meta device: its structure stays, a later call of it fails loudly). A
    pipeline's text encoder can be several times its transformer (T5-XXL: 4.8 B parameters)."""
    for part in binding.parts:
        part.encoder.to("meta")
    vae = getattr(binding.pipe, "vae", None)
    if isinstance(vae, torch.nn.Module):
        vae.to("meta")


@torch.no_grad()
def export_fp_pipeline(
    folder: Path, out: Path, prompt: str, steps: int, call: dict[str, Any],
    precision: PartPrecision = PartPrecision.FP32,
) -> dict[str, Any]:  # fmt: skip
    """An FP build of a pipeline folder for the edge loop (runtime.pipeline_loop): text parts and
    the VAE decoder, transformer.onnx with its bound inputs, the scheduler block; returns the
    manifest (also written to out/manifest.json). All in FP32 unless `precision` stores the text
    and VAE parts' weights otherwise (the FP reference a quantized build is compared with).

    Raises:
        QexportError: anything of the pipeline that is not bound or not exportable, by name.
    """
    from qexport.exporter.manifest import write_manifest

    from qexport.runtime.manifest import SCHEMA_VERSION

    if out.exists():
        raise QexportError(f"{out} exists; choose a new folder")
    binding = bind_pipeline(folder, prompt, steps, call)
    with written_whole(out) as tmp:  # whole or not at all
        try:
            export_denoiser(binding.pipe.transformer, binding.first, binding.calls[0]["inputs"],
                            tmp / "transformer.onnx")  # fmt: skip
        except (RuntimeError, torch.onnx.errors.OnnxExporterError) as exc:
            name = type(binding.pipe.transformer).__name__
            raise QexportError(f"cannot export {name} with its recorded inputs to ONNX: {exc}") from exc
        pipeline = {**write_parts(binding, tmp, precision), "denoiser": "transformer.onnx"}
        manifest = {
            "schema_version": SCHEMA_VERSION,
            "pipeline": pipeline,
            "scheduler": binding.block,
            "latent_shape": list(binding.trace.samples[0].shape[1:]),
        }
        write_manifest(tmp, manifest)
    return manifest
