"""A user's diffusers pipeline folder, run by the pipeline's own ``__call__``: the folder loaded by
its model_index.json (every component class taken from it), and one sampling run traced — how the
pipeline set up its scheduler, what the scheduler was given and returned at every step (the
sample, the guided model output after any learned-sigma split), and every keyword input of every
transformer call with the step it belongs to (from the scheduler's step count, not by counting
calls: a pipeline may call the transformer more than once per step)."""

from __future__ import annotations

import copy
import functools
import inspect
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from qexport.errors import QexportError
from qexport.models.registry import read_json
from qexport.models.trust import check_pipeline_index

KEPT_STEPS = 2  # the steps whose transformer inputs and outputs a trace keeps (exporter.pipeline_parts)
OFFLINE = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}  # a folder never reaches for the hub


@dataclass(frozen=True, kw_only=True)
class TensorSpec:
    shape: tuple[int, ...]
    dtype: str

    @classmethod
    def of(cls, t: torch.Tensor) -> TensorSpec:
        return cls(shape=tuple(t.shape), dtype=str(t.dtype).removeprefix("torch."))


@dataclass(kw_only=True)
class TransformerCall:
    """One call of a denoiser: the step it belongs to, the module, and its inputs by keyword
    (tensors by spec; other values as given, nested dicts flattened with dots)."""

    step: int
    module: str  # "transformer" or e.g. "transformer_2" (Wan 2.2's low-noise expert)
    tensors: dict[str, TensorSpec] = field(default_factory=dict)
    values: dict[str, Any] = field(default_factory=dict)
    kept: dict[str, np.ndarray] = field(default_factory=dict)  # the tensors' values (first KEPT_STEPS steps)
    output: np.ndarray | None = None  # the call's first output (first KEPT_STEPS steps)


@dataclass(kw_only=True)
class Trace:
    """One traced sampling run."""

    pipeline: str  # the pipeline class
    scheduler: Any  # a pristine copy of the folder's scheduler, as loaded (before set_timesteps)
    set_timesteps: dict[str, Any] = field(default_factory=dict)  # the keywords the pipeline set it up with
    samples: list[np.ndarray] = field(default_factory=list)  # x[i]: what scheduler.step got as the sample
    outputs: list[np.ndarray] = field(default_factory=list)  # the model output scheduler.step got (guided)
    timesteps: list[float] = field(default_factory=list)
    results: list[np.ndarray] = field(default_factory=list)  # x[i+1]: what scheduler.step returned
    calls: list[TransformerCall] = field(default_factory=list)
    output: Any = None  # what __call__ returned


def load_pipeline(folder: Path) -> Any:
    """The pipeline of a folder written by save_pretrained, every class taken from its model_index.json:
    classes of diffusers and transformers only, weights from safetensors only (models.trust).

    Raises:
        QexportError: no folder or no model_index.json, a component folder it names missing, a class
            the installed diffusers / transformers lack or that would run the folder's own code, pickled
            weights, a tokenizer without tokenizer.json.
    """
    folder = Path(folder)
    index_path = folder / "model_index.json"
    if not index_path.is_file():
        raise QexportError(f"{folder} has no model_index.json; point at a folder saved by a pipeline's save_pretrained")
    index = read_json(index_path)
    for name, spec in index.items():
        if name.startswith("_") or not isinstance(spec, list) or spec[0] is None:
            continue
        if not (folder / name).is_dir():
            raise QexportError(
                f"{folder} names a {spec[1]} component {name!r} in model_index.json but has no {name}/ folder"
            )
    from qexport.models.builtin_pipeline import CLASS_NAMES, load_qexport_pipeline

    check_pipeline_index(folder, index, own=CLASS_NAMES)
    if index.get("_class_name") in CLASS_NAMES:  # a qexport model (the built-ins): its own loop
        return load_qexport_pipeline(folder)
    import diffusers

    cls = getattr(diffusers, str(index["_class_name"]))
    saved = {k: os.environ.get(k) for k in OFFLINE}
    os.environ.update(OFFLINE)
    try:
        return cls.from_pretrained(str(folder), torch_dtype=torch.float32, use_safetensors=True)
    except (OSError, ValueError, ImportError, AttributeError) as exc:
        raise QexportError(f"cannot load {index['_class_name']} from {folder}: {exc}") from exc
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def denoisers(pipe: Any) -> dict[str, torch.nn.Module]:
    """The pipeline's transformer(s) by component name."""
    found = {name: m for name, m in pipe.components.items() if name.startswith("transformer") and m is not None}
    if not found:
        raise QexportError(
            f"{type(pipe).__name__} has no transformer component; qexport exports diffusion transformers"
        )
    return found


def call_default(pipe: Any, name: str) -> Any:
    """A keyword's default in the pipeline's __call__ (None when it has none)."""
    p = inspect.signature(type(pipe).__call__).parameters.get(name)
    return None if p is None or p.default is inspect.Parameter.empty else p.default


# __call__ arguments with which a pipeline keeps its caption embeddings at the padded length
# (Latte's mask_feature=True cuts them to the prompt's tokens: no fixed-shape model can follow)
FIXED_LENGTH_CALLS = {"mask_feature": False}


def length_fixes(pipe: Any, call: dict[str, Any]) -> list[str]:
    """The FIXED_LENGTH_CALLS the pipeline takes and this call does not set so, as --call options."""
    takes = call_parameters(pipe)
    return [f"--call {k}={str(v).lower()}" for k, v in FIXED_LENGTH_CALLS.items()
            if k in takes and call.get(k, call_default(pipe, k)) != v]  # fmt: skip


def takes_labels(pipe: Any) -> bool:
    """Whether the pipeline is class-conditional (DiT: class_labels, no prompt)."""
    params = call_parameters(pipe)
    return "class_labels" in params and "prompt" not in params


def call_parameters(pipe: Any) -> tuple[str, ...]:
    """The keywords of the pipeline's __call__."""
    return tuple(inspect.signature(type(pipe).__call__).parameters)


def label_ids(pipe: Any, labels: list[str]) -> list[int]:
    """Class ids of labels: names from the folder's id2label (``pipe.labels``), or class ids.

    Raises:
        QexportError: a label that is neither, naming the choices.
    """
    names: dict[str, int] = dict(getattr(pipe, "labels", {}) or {})
    classes = int(getattr(pipe.transformer.config, "num_embeds_ada_norm", 0) or 0)
    ids = []
    for label in labels:
        if label in names:
            ids.append(names[label])
        elif label.strip().isdigit() and int(label) < classes:
            ids.append(int(label))
        else:
            known = f"one of {', '.join(list(names)[:8])}{' ...' if len(names) > 8 else ''}, or " if names else ""
            raise QexportError(f"class label {label!r} is not known to {type(pipe).__name__}; give {known}"
                               f"a class id in 0..{classes - 1}")  # fmt: skip
    return ids


def check_prompts(pipe: Any, prompts: list[str], call: dict[str, Any]) -> None:
    """Refuse a prompt longer than a tokenizer of the pipeline takes: its model_max_length, or the
    call's max_sequence_length where that is shorter (T5: the pipeline would cut the rest silently).

    Raises:
        QexportError: naming the prompt, the tokenizer and both lengths.
    """
    cap = call.get("max_sequence_length", call_default(pipe, "max_sequence_length"))
    for name, tokenizer in sorted(pipe.components.items()):
        if not name.startswith("tokenizer") or tokenizer is None:
            continue
        limit = int(tokenizer.model_max_length)
        limit = min(limit, int(cap)) if isinstance(cap, int) else limit
        for prompt in prompts:
            count = len(tokenizer(prompt)["input_ids"])
            if count > limit:
                raise QexportError(
                    f"prompt {prompt[:40]!r} is {count} tokens for {name}, which takes {limit}; shorten it"
                    + (
                        " or raise --call max_sequence_length"
                        if isinstance(cap, int) and cap < tokenizer.model_max_length
                        else ""
                    )
                )


def check_condition(pipe: Any, condition: str, call: dict[str, Any]) -> None:
    """Refuse a condition the pipeline does not take: a class label it does not know (a
    class-conditional pipeline), or a prompt longer than its tokenizers take.

    Raises:
        QexportError: as label_ids and check_prompts.
    """
    if takes_labels(pipe):
        label_ids(pipe, [condition])
    else:
        check_prompts(pipe, [condition], call)


def _flatten(prefix: str, value: Any, call: TransformerCall, keep: bool) -> None:
    if isinstance(value, torch.Tensor):
        call.tensors[prefix] = TensorSpec.of(value)
        if keep:
            call.kept[prefix] = value.detach().cpu().numpy().copy()
    elif isinstance(value, dict):
        for k, v in value.items():
            _flatten(f"{prefix}.{k}", v, call, keep)
    else:
        call.values[prefix] = value


def _plain(value: Any) -> Any:
    """A set_timesteps keyword as JSON-able data (sigmas come as numpy arrays or lists)."""
    if isinstance(value, np.ndarray | torch.Tensor):
        return np.asarray(value, dtype=np.float64).tolist()
    if isinstance(value, np.floating | np.integer):
        return value.item()
    return value


CallHook = Callable[[int, int], None]  # (step index, batch) before each transformer call


@contextmanager
def tracing(pipe: Any, on_call: CallHook | None = None, keep: bool = True) -> Iterator[Trace]:
    """Within the block, the pipeline's scheduler and transformer calls are recorded into the trace;
    on_call, if given, hears each transformer call's step and batch before the call runs. With
    keep False only the timesteps and the calls' specs are recorded (no tensors: a long run)."""
    scheduler = pipe.scheduler
    trace = Trace(pipeline=type(pipe).__name__, scheduler=copy.deepcopy(scheduler))
    set_timesteps, step = scheduler.set_timesteps, scheduler.step

    @functools.wraps(set_timesteps)  # pipelines inspect its signature (sigmas, timesteps)
    def record_set_timesteps(*args: Any, **kwargs: Any) -> Any:
        names = ("num_inference_steps", "device")
        given = {**dict(zip(names, args, strict=False)), **kwargs}
        trace.set_timesteps = {k: _plain(v) for k, v in given.items() if k != "device" and v is not None}
        return set_timesteps(*args, **kwargs)

    @functools.wraps(step)  # pipelines inspect its signature (generator, eta)
    def record_step(model_output: torch.Tensor, timestep: Any, sample: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        result = step(model_output, timestep, sample, *args, **kwargs)
        trace.timesteps.append(float(timestep))
        if keep:
            prev = result[0] if isinstance(result, tuple) else result.prev_sample
            trace.samples.append(sample.detach().double().cpu().numpy())
            trace.outputs.append(model_output.detach().double().cpu().numpy())
            trace.results.append(prev.detach().double().cpu().numpy())
        return result

    def hook(name: str) -> Any:
        def pre(module: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            call = TransformerCall(step=len(trace.timesteps), module=name)
            kept = keep and call.step < KEPT_STEPS
            for i, a in enumerate(args):
                _flatten(f"arg{i}", a, call, kept)
            for k, v in kwargs.items():
                _flatten(k, v, call, kept)
            trace.calls.append(call)
            if on_call is not None:
                x = call.tensors.get("hidden_states") or call.tensors.get("arg0")
                on_call(call.step, x.shape[0] if x is not None and x.shape else 1)

        return pre

    def post(module: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], out: Any) -> None:
        call = trace.calls[-1]
        first = out[0] if isinstance(out, tuple | list) else getattr(out, "sample", out)
        if keep and call.step < KEPT_STEPS and isinstance(first, torch.Tensor):
            call.output = first.detach().cpu().numpy().copy()

    handles = [m.register_forward_pre_hook(hook(name), with_kwargs=True) for name, m in denoisers(pipe).items()]
    handles += [m.register_forward_hook(post, with_kwargs=True) for m in denoisers(pipe).values()]
    scheduler.set_timesteps, scheduler.step = record_set_timesteps, record_step
    try:
        yield trace
    finally:
        scheduler.set_timesteps, scheduler.step = set_timesteps, step
        for h in handles:
            h.remove()


@torch.no_grad()
def trace_call(pipe: Any, on_call: CallHook | None = None, **kwargs: Any) -> Trace:
    """Run the pipeline's own __call__ with these arguments and return its trace."""
    with tracing(pipe, on_call) as trace:
        trace.output = pipe(**kwargs)
    if not trace.timesteps:
        raise QexportError(f"{trace.pipeline} called no scheduler step; nothing to calibrate")
    return trace


class _Stop(Exception):
    """Ends a probing call of a pipeline at its transformer's first call."""


@torch.no_grad()
def sample_shape(pipe: Any, **kwargs: Any) -> tuple[int, ...]:
    """The shape of one prompt's first sample (what the pipeline's ``latents=`` takes): the
    transformer's first input without its batch, read at its first call, where the call is cut
    short (text encoding and latent set-up only)."""
    seen: list[tuple[int, ...]] = []

    def stop(module: torch.nn.Module, args: tuple[Any, ...], kw: dict[str, Any]) -> None:
        x = args[0] if args else kw.get("hidden_states")
        if isinstance(x, torch.Tensor):
            seen.append(tuple(x.shape))
        raise _Stop

    handles = [m.register_forward_pre_hook(stop, with_kwargs=True) for m in denoisers(pipe).values()]
    try:
        pipe(**kwargs)
    except _Stop:
        pass
    finally:
        for h in handles:
            h.remove()
    if not seen:
        raise QexportError(f"{type(pipe).__name__} did not call its transformer with a latent tensor first")
    return (1, *seen[0][1:])


@contextmanager
def starting_from(pipe: Any, noise: torch.Tensor) -> Iterator[dict[str, Any]]:
    """Within the block, the pipeline starts from `noise`: yields ``{"latents": noise}`` for a
    pipeline that takes latents=; a pipeline that does not (DiT) draws its initial noise with its
    module's ``randn_tensor``, which then returns `noise` (once, for a matching shape).

    Raises:
        QexportError: the pipeline asks for noise of another shape.
    """
    if "latents" in call_parameters(pipe):
        yield {"latents": noise}
        return
    import sys

    module = sys.modules[type(pipe).__module__]
    original = getattr(module, "randn_tensor", None)
    if original is None:
        raise QexportError(f"{type(pipe).__name__} takes no latents= and draws no randn_tensor; cannot set its noise")
    given = [noise]

    def randn(shape: Any, *args: Any, **kwargs: Any) -> torch.Tensor:
        if not given:
            return original(shape, *args, **kwargs)
        if tuple(shape) != tuple(noise.shape):
            raise QexportError(f"{type(pipe).__name__} draws noise {list(shape)}, not {list(noise.shape)}")
        dtype, device = kwargs.get("dtype"), kwargs.get("device")
        return given.pop().to(device=device, dtype=dtype)

    setattr(module, "randn_tensor", randn)  # noqa: B010 (a module attribute mypy cannot see)
    try:
        yield {}
    finally:
        setattr(module, "randn_tensor", original)  # noqa: B010
