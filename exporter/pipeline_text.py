"""The text side of a pipeline's binding (exporter.pipeline_parts): each shipped text part's outputs
for the prompt and the negative prompt at a padded length (with the mask, without it, or zeroed past
the prompt's tokens), and the search, by value, for the text output, mask or join of outputs (SD3:
its CLIPs side by side, padded to T5's width, then T5 on the sequence) that a transformer input is,
in one of the orders a pipeline batches its prompt and negative prompt."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from qexport.exporter.text_encoders import TextPart, encoder_outputs

from qexport.models.pipeline import Trace
from qexport.runtime.pipeline_loop import joined_value

RTOL = 1e-5
ORDERS = ("uncond,cond", "cond,uncond", "cond", "uncond")  # how a pipeline batches its prompt and negative prompt


def same(a: np.ndarray, b: np.ndarray) -> bool:
    if np.shape(a) != np.shape(b):
        return False
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return bool(np.all(np.abs(a - b) <= RTOL * max(float(np.abs(b).max()), 1e-12)))


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
    """The encoder's outputs, computed where the encoder is (the device the pipeline was traced on)."""
    where = next(part.encoder.parameters()).device
    mask = None if mask is None else mask.to(where)
    with torch.no_grad():
        return {k: v.float().cpu().numpy() for k, v in encoder_outputs(part.encoder, ids.to(where), mask).items()}


def text_source(value: np.ndarray, texts: dict[str, dict[str, dict[str, np.ndarray]]]) -> dict[str, Any] | None:
    """texts: part -> {"cond": outputs, "uncond": outputs}."""
    for part, sides in texts.items():
        for output in sides["cond"]:
            for order in ORDERS:
                if same(value, np.concatenate([sides[side][output] for side in order.split(",")])):
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
        if same(t, v):
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


def joined_source(value: np.ndarray, texts: Texts) -> dict[str, Any] | None:
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
        if same(value, np.concatenate(rebuilt)):
            return {"source": "joined", "join": join, "order": order}
    return None


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
            if any(text_source(v, {part.name: hidden}) for v in kept):  # a mask alone is too easily matched
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
