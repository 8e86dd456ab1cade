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
import inspect
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
from qexport.exporter.text_encoders import TextPart, encoder_outputs
from torch import nn

from qexport.errors import QexportError
from qexport.models.pipeline import Trace, TransformerCall
from qexport.runtime.pipeline_loop import joined_value, label_value

RTOL = 1e-5
OTHER_PROMPT = "a second, different caption"  # traced too: what depends on the prompt is not a constant
Labels = tuple[dict[str, int], dict[str, int]]  # both traced runs' class ids by side: {"cond": id, "uncond": null}
DENOISER_OPSET = 17
ORDERS = ("uncond,cond", "cond,uncond", "cond", "uncond")  # how a pipeline batches its prompt and negative prompt


def _same(a: np.ndarray, b: np.ndarray) -> bool:
    if np.shape(a) != np.shape(b):
        return False
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return bool(np.all(np.abs(a - b) <= RTOL * max(float(np.abs(b).max()), 1e-12)))


# __call__ arguments with which a pipeline keeps its caption embeddings at the padded length
# (Latte's mask_feature=True cuts them to the prompt's tokens)
FIXED_LENGTH_CALLS = {"mask_feature": False}


def call_default(pipe: Any, name: str) -> Any:
    """A keyword's default in the pipeline's __call__ (None when it has none)."""
    p = inspect.signature(type(pipe).__call__).parameters.get(name)
    return None if p is None or p.default is inspect.Parameter.empty else p.default


def _length_fixes(pipe: Any, call: dict[str, Any]) -> list[str]:
    """The FIXED_LENGTH_CALLS the pipeline takes and this call does not set so, as --call options."""
    takes = inspect.signature(type(pipe).__call__).parameters
    return [f"--call {k}={str(v).lower()}" for k, v in FIXED_LENGTH_CALLS.items()
            if k in takes and call.get(k, call_default(pipe, k)) != v]  # fmt: skip


@torch.no_grad()
def text_values(part: TextPart, prompt: str, length: int) -> dict[str, np.ndarray]:
    """The part's outputs and mask for a prompt, tokenized as the edge tokenizes (padded to length);
    for an encoder that reads the mask, also its outputs without one (``<output>:unmasked``: Flux
    calls T5 so), which the edge computes with a mask of ones; and each hidden state with its
    padding positions zeroed (``<output>:zeroed``, the output times the mask: Wan cuts each
    caption to its length and pads with zeros)."""
    tokens = part.tokenizer(prompt, padding="max_length", max_length=length, truncation=True, return_tensors="pt")
    mask = tokens["attention_mask"].numpy()
    values = _encoded(part, tokens["input_ids"], tokens["attention_mask"] if part.takes_mask else None)
    if part.takes_mask:
        ones = _encoded(part, tokens["input_ids"], torch.ones_like(tokens["attention_mask"]))
        values.update({f"{k}:unmasked": v for k, v in ones.items()})
    hidden = {k: v for k, v in values.items() if ":" not in k and v.shape[:2] == mask.shape}
    zeroed = {f"{k}:zeroed": v * mask[..., None] for k, v in hidden.items()}
    return {**values, **zeroed, "mask": mask}


def _encoded(part: TextPart, ids: torch.Tensor, mask: torch.Tensor | None) -> dict[str, np.ndarray]:
    return {k: v.numpy() for k, v in encoder_outputs(part.encoder, ids, mask).items()}


def _text_source(value: np.ndarray, texts: dict[str, dict[str, dict[str, np.ndarray]]]) -> dict[str, Any] | None:
    """texts: part -> {"cond": outputs, "uncond": outputs}."""
    for part, sides in texts.items():
        for output in sides["cond"]:
            for order in ORDERS:
                if _same(value, np.concatenate([sides[side][output] for side in order.split(",")])):
                    kind = "mask" if output == "mask" else "text"
                    return {"source": kind, "part": part, "output": output, "order": order}
    return None


Texts = dict[str, dict[str, dict[str, np.ndarray]]]  # part -> "cond" / "uncond" -> output -> value
Leaves = dict[tuple[Any, ...], np.ndarray]  # (part, output[, length, side]) -> one side's value [1, ...]
JOIN_DEPTH = 2  # joins of joins: SD3's CLIPs side by side (padded), then T5 on the sequence


def _leaves(texts: Texts, side: str) -> Leaves:
    return {(part, k): v for part, sides in texts.items() for k, v in sides[side].items() if k != "mask"}


def _decompose(t: np.ndarray, leaves: Leaves, depth: int = JOIN_DEPTH) -> dict[str, Any] | None:
    """One sample `t` [1, ...] as a text output (a leaf: its key's part, output[, length]) or a join:
    pieces concatenated on one axis, the last axis zero-padded to a width (runtime joined_value)."""
    for key, v in leaves.items():
        if _same(t, v):
            return dict(zip(("part", "output", "length"), key, strict=False))
    if depth == 0:
        return None
    return next((j for axis in range(1, t.ndim) if (j := _split(t, axis, leaves, depth)) is not None), None)


def _split(t: np.ndarray, axis: int, leaves: Leaves, depth: int) -> dict[str, Any] | None:
    """`t` cut on `axis` into consecutive pieces the leaves' sizes long, each decomposed; trailing
    zeros on the last axis are padding."""
    size = t.shape[axis]
    sizes = sorted({v.shape[axis] for v in leaves.values() if v.ndim == t.ndim and v.shape[axis] < size}, reverse=True)
    pieces: list[dict[str, Any]] = []
    start = 0
    while start < size:
        if pieces and axis == t.ndim - 1 and not np.take(t, range(start, size), axis).any():
            return {"axis": axis, "pieces": pieces, "width": size}
        chunks = ((n, np.take(t, range(start, start + n), axis)) for n in sizes if start + n <= size)
        n, piece = next(((n, p) for n, c in chunks if (p := _decompose(c, leaves, depth - 1)) is not None), (0, None))
        if piece is None:
            return None
        pieces.append(piece)
        start += n
    return {"axis": axis, "pieces": pieces} if len(pieces) > 1 else None


def _joined_source(value: np.ndarray, texts: Texts) -> dict[str, Any] | None:
    """A join of text outputs found in one sample of `value` and checked on all of it, in one of the
    CFG orders."""
    for order in ORDERS:
        sides = order.split(",")
        if not value.ndim or len(value) != len(sides):
            continue
        join = _decompose(value[:1], _leaves(texts, sides[0]))
        if join is None or "part" in join:
            continue
        rebuilt = [joined_value(join, {p: s[side] for p, s in texts.items()}) for side in sides]
        if _same(value, np.concatenate(rebuilt)):
            return {"source": "joined", "join": join, "order": order}
    return None


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
            if value.ndim and _same(value, np.concatenate([x] * max(batch // len(x), 1))) and batch % len(x) == 0:
                layout.append({**spec, "source": "latents", "repeat": batch // len(x)})
            elif later is not None and _is_timestep(value, later.kept[name], block):
                layout.append({**spec, "source": "timestep", "factor": float(value.flat[0]) / t0})
            elif (found := _text_source(value, texts) or _joined_source(value, texts)
                   or _label_source(value, elsewhere[k].kept[name], labels)) is not None:  # fmt: skip
                layout.append({**spec, **found})
            elif later is not None and _same(value, later.kept[name]) and _same(value, elsewhere[k].kept[name]):
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
    """One value broadcast over the batch, the same multiple of the block's timestep at steps 0 and 1."""
    t0, t1 = block["steps"][0]["timestep"], block["steps"][1]["timestep"]
    if not v0.size or v0.ndim > 1 or not t0 or not _same(v0, np.full(v0.shape, float(v0.flat[0]))):
        return False
    f0 = float(v0.flat[0]) / t0
    return bool(t1) and abs(float(v1.flat[0]) / t1 - f0) <= 1e-5 * max(abs(f0), 1e-12)


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
        if got.shape == want.shape and _same(got, want):
            return {"split": split, "cfg": rule, "guidance": guidance}
    raise QexportError(f"{trace.pipeline}'s model output is not the transformer's output with CFG; not supported yet")


class BoundTransformer(nn.Module):
    """The transformer called with the bound inputs as positional ONNX inputs, constants inside."""

    def __init__(self, transformer: nn.Module, call: TransformerCall, layout: list[dict[str, Any]]) -> None:
        super().__init__()
        self.transformer = transformer
        self.names = [i["name"] for i in layout if i["source"] != "constant"]
        self.constants = {
            i["name"]: torch.from_numpy(call.kept[i["name"]]) for i in layout if i["source"] == "constant"
        }
        self.values = dict(call.values)

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        flat: dict[str, Any] = {**self.values, **self.constants, **dict(zip(self.names, inputs, strict=True))}
        args = [flat.pop(k) for k in sorted(k for k in flat if k.startswith("arg") and k[3:].isdigit())]
        kwargs: dict[str, Any] = {}
        for key, value in flat.items():
            head, _, rest = key.partition(".")
            if rest:
                kwargs.setdefault(head, {})[rest] = value
            else:
                kwargs[key] = value
        out = self.transformer(*args, **kwargs)
        return out[0] if isinstance(out, tuple | list) else out.sample


def _rms_norm(g: Any, x: Any, shape: Any, weight: Any, eps: Any) -> Any:
    """aten::rms_norm (Flux's, Wan's RMS norms) for the TorchScript exporter, which has none:
    x / sqrt(mean(x², last axes) + eps) · weight (ReduceMean's axes an attribute before opset 18)."""
    from torch.onnx import symbolic_helper as sh

    dims = sh._get_const(shape, "is", "normalized_shape")
    value = sh._maybe_get_const(eps, "f")
    epsilon = float(torch.finfo(torch.float32).eps) if sh._is_none(eps) else float(value)
    axes = list(range(-len(dims), 0))
    if sh.GLOBALS.export_onnx_opset_version >= 18:  # axes became an input
        square = g.op("Mul", x, x)
        mean = g.op("ReduceMean", square, g.op("Constant", value_t=torch.tensor(axes)), keepdims_i=1)
    else:
        mean = g.op("ReduceMean", g.op("Mul", x, x), axes_i=axes, keepdims_i=1)
    root = g.op("Sqrt", g.op("Add", mean, g.op("Constant", value_t=torch.tensor(epsilon, dtype=torch.float32))))
    y = g.op("Div", x, root)
    return y if sh._is_none(weight) else g.op("Mul", y, weight)


def _repeat_interleave(g: Any, x: Any, repeats: Any, dim: Any = None, output_size: Any = None) -> Any:
    """aten::repeat_interleave with its own copy of `dim`: torch's opset-13 symbolic adds the rank to a
    negative dim in place, on the constant the tracer shares with every other -1 of the graph (LTX's
    rope then turns its timestep embedding's concat axis -1 into 2)."""
    from torch.onnx import symbolic_helper as sh
    from torch.onnx import symbolic_opset13

    if not sh._is_none(dim):
        dim = g.op("Constant", value_t=torch.tensor(int(sh._maybe_get_const(dim, "i"))))
    return symbolic_opset13.repeat_interleave(g, x, repeats, dim, output_size)


torch.onnx.register_custom_op_symbolic("aten::rms_norm", _rms_norm, DENOISER_OPSET)
torch.onnx.register_custom_op_symbolic("aten::repeat_interleave", _repeat_interleave, DENOISER_OPSET)


@torch.no_grad()
def export_denoiser(transformer: nn.Module, call: TransformerCall, layout: list[dict[str, Any]], path: Path) -> None:
    """transformer.onnx with the layout's non-constant inputs, FP32, static shapes."""
    model = BoundTransformer(transformer, call, layout).eval()
    inputs = tuple(torch.from_numpy(call.kept[n]) for n in model.names)
    torch.onnx.export(model, inputs, str(path), dynamo=False, opset_version=DENOISER_OPSET, input_names=model.names,
                      output_names=["output"], do_constant_folding=True)  # fmt: skip
    onnx.checker.check_model(str(path))


def _lengths(trace: Trace, named: tuple[int, ...]) -> list[int]:
    """Token counts a text part may have been padded to: every recorded tensor's second axis, 77,
    and the counts the call names (its max_sequence_length: a piece of a joined input, SD3's T5)."""
    dims = {v.shape[1] for c in trace.calls for v in c.kept.values() if v.ndim >= 2}
    return sorted(dims | {77} | set(named))


def text_inputs(
    parts: list[TextPart], trace: Trace, prompt: str, negative: str, named: tuple[int, ...] = ()
) -> tuple[dict[str, int], Texts]:
    """Each used part's padded length and its values for the prompt and the negative prompt: the
    length at which one of its outputs is one of the transformer's inputs, or else a piece of a join
    that is one (every candidate length of such parts tried at once); parts never fed are left out."""
    kept = [v for c in trace.calls if c.step == 0 for v in c.kept.values()]
    lengths: dict[str, int] = {}
    texts: Texts = {}
    tried: dict[str, dict[int, dict[str, dict[str, np.ndarray]]]] = {}
    for part in parts:
        for length in [n for n in _lengths(trace, named) if n <= part.tokenizer.model_max_length]:
            sides = {"cond": text_values(part, prompt, length), "uncond": text_values(part, negative, length)}
            hidden = {side: {k: v for k, v in values.items() if k != "mask"} for side, values in sides.items()}
            if any(_text_source(v, {part.name: hidden}) for v in kept):  # a mask alone is too easily matched
                lengths[part.name], texts[part.name] = length, sides
                break
            tried.setdefault(part.name, {})[length] = sides
    loose = {name: by for name, by in tried.items() if name not in lengths}  # fed only as pieces of a join, if at all
    if loose:
        found = {**{n: {lengths[n]: sides} for n, sides in texts.items()}, **loose}
        leaves = {(name, k, n, side): v for name, by in found.items() for n, sides in by.items() for side in sides
                  for k, v in sides[side].items() if k != "mask"}  # fmt: skip
        for v in (v for v in kept if v.ndim >= 2):
            for piece in _pieces(_decompose(v[:1], leaves)):
                if piece["part"] in loose and piece["part"] not in lengths:
                    lengths[piece["part"]] = piece["length"]
                    texts[piece["part"]] = loose[piece["part"]][piece["length"]]
    return lengths, texts


def _pieces(join: dict[str, Any] | None) -> list[dict[str, Any]]:
    """The leaves (text outputs) of a join."""
    if join is None:
        return []
    return [join] if "part" in join else [leaf for p in join["pieces"] for leaf in _pieces(p)]


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
def bind_pipeline(folder: Path, prompt: str, steps: int, call: dict[str, Any]) -> Binding:
    """Trace the pipeline folder's own __call__ (seed 0) and bind its transformer's inputs.

    Raises:
        QexportError: anything of the pipeline that is not bound or not exportable, by name.
    """
    from qexport.exporter.text_encoders import text_parts
    from qexport.exporter.vae import vae_supported

    from qexport.models.pipeline import label_ids, load_pipeline, takes_labels, trace_call
    from qexport.models.scheduler import check, probe

    pipe = load_pipeline(folder)
    labels = _label_block(pipe) if takes_labels(pipe) else None
    if labels is None and "prompt" not in inspect.signature(type(pipe).__call__).parameters:
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
    check_shapes(trace, runs[1], _length_fixes(pipe, call))
    block = probe(trace.scheduler, steps, trace.set_timesteps)
    check(trace.scheduler, block)
    parts = text_parts(pipe)
    named = call.get("max_sequence_length", call_default(pipe, "max_sequence_length"))
    lengths, texts = text_inputs(parts, trace, prompt, negative, (named,) if isinstance(named, int) else ())
    calls = bind_inputs(trace, block, texts, runs[1], sides)
    rule = output_rule(trace, guidance)
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
    if not all(len(v) % 2 == 0 and _same(*np.split(v, 2)) for s in series for v in s):
        return trace
    half = [[v[: len(v) // 2] for v in s] for s in series]
    return dataclasses.replace(trace, samples=half[0], outputs=half[1], results=half[2])


@torch.no_grad()
def write_parts(binding: Binding, folder: Path) -> dict[str, Any]:
    """The text parts and the VAE decoder in `folder`; returns the manifest's pipeline block (its
    denoiser entry left to the caller)."""
    from qexport.exporter.text_encoders import export_text_part
    from qexport.exporter.vae import export_vae_decoder, latent_grid

    b = binding
    text_specs = [export_text_part(p, folder, b.lengths[p.name]) for p in b.parts if p.name in b.lengths]
    latents = torch.from_numpy(b.trace.results[-1][:1].astype(np.float32))
    vae = export_vae_decoder(b.pipe, latents, folder, grid=latent_grid(b.first.values))
    labels = {} if b.labels is None else {"labels": b.labels}
    return {"class": b.trace.pipeline, "negative_prompt": b.negative, "calls": b.calls, **b.rule,
            "text": text_specs, **labels, "vae": vae}  # fmt: skip


def partial_folder(out: Path) -> Path:
    """A fresh ``<out>.partial`` to write a build into, renamed to `out` when whole.

    Raises:
        QexportError: `out` exists.
    """
    if out.exists():
        raise QexportError(f"{out} exists; choose a new folder")
    partial = out.with_name(out.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    return partial


@torch.no_grad()
def export_fp_pipeline(folder: Path, out: Path, prompt: str, steps: int, call: dict[str, Any]) -> dict[str, Any]:
    """An FP build of a pipeline folder for the edge loop (runtime.pipeline_loop): text parts,
    transformer.onnx with its bound inputs, the scheduler block, the VAE decoder; returns the
    manifest (also written to out/manifest.json).

    Raises:
        QexportError: anything of the pipeline that is not bound or not exportable, by name.
    """
    import json

    binding = bind_pipeline(folder, prompt, steps, call)
    partial = partial_folder(out)
    try:
        try:
            export_denoiser(binding.pipe.transformer, binding.first, binding.calls[0]["inputs"],
                            partial / "transformer.onnx")  # fmt: skip
        except (RuntimeError, torch.onnx.errors.OnnxExporterError) as exc:
            name = type(binding.pipe.transformer).__name__
            raise QexportError(f"cannot export {name} with its recorded inputs to ONNX: {exc}") from exc
        pipeline = {**write_parts(binding, partial), "denoiser": "transformer.onnx"}
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    manifest = {
        "schema_version": 3,
        "pipeline": pipeline,
        "scheduler": binding.block,
        "latent_shape": list(binding.trace.samples[0].shape[1:]),
    }
    (partial / "manifest.json").write_text(json.dumps(manifest, indent=1))
    partial.rename(out)  # whole or not at all
    return manifest
