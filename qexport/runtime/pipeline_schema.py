"""The schema of a manifest's `pipeline` block (runtime.pipeline_loop runs it): the text parts and
their tokenizers, the transformer calls of a step with each input's binding, the output rule (split,
CFG, guidance), the class labels, the VAE decoder; and the checks across its entries."""

from __future__ import annotations

import math
from typing import Annotated, Literal

from pydantic import Discriminator, Field, Tag

from qexport.runtime.schema_types import (
    MAX_ELEMENTS,
    MAX_ENTRIES,
    BuildFile,
    Coef,
    Count,
    Dim,
    DType,
    Name,
    Order,
    Shape,
    Text,
)
from qexport.schema import Strict as StrictModel

MAX_JOIN_DEPTH = 4  # joins of text outputs (SD3's are 2 deep)
MAX_TIMESTEPS = 4096  # values of a pipeline's timestep input (one per batch row)


class TextPart(StrictModel):
    name: Annotated[str, Field(pattern=r"^[A-Za-z0-9_]{1,64}$")]
    model: BuildFile
    tokenizer: BuildFile
    class_: Name = Field(alias="class")
    max_length: Annotated[int, Field(ge=1, le=65_536)]
    pad_id: Annotated[int, Field(ge=0, le=1 << 31)]
    inputs: Annotated[list[Literal["input_ids", "attention_mask"]], Field(min_length=1, max_length=2)]
    outputs: Annotated[list[Name], Field(min_length=1, max_length=16)]
    precision: Literal["fp16", "fp32", "int8-weights"]
    data: BuildFile | None = None


class Vae(StrictModel):
    model: BuildFile
    class_: Name = Field(alias="class")
    layout: Literal["image", "video", "packed", "frames", "video_frames_first", "video_packed"]
    scaling_factor: Coef
    shift_factor: Coef
    latents: Shape
    latents_mean: Annotated[list[Coef], Field(max_length=4096)] | None = None
    latents_std: Annotated[list[Coef], Field(max_length=4096)] | None = None
    height: Dim | None = None
    width: Dim | None = None
    grid: Annotated[list[Dim], Field(min_length=3, max_length=3)] | None = None
    patch_size: Dim | None = None
    patch_size_t: Dim | None = None
    precision: Literal["fp16", "fp32", "int8-weights"]
    data: BuildFile | None = None


class Labels(StrictModel):
    names: Annotated[dict[Name, Annotated[int, Field(ge=0, le=MAX_ENTRIES)]], Field(max_length=MAX_ENTRIES)]
    classes: Annotated[int, Field(ge=1, le=MAX_ENTRIES)]
    null: Annotated[int, Field(ge=0, le=MAX_ENTRIES)]


class JoinLeaf(StrictModel):
    part: Name
    output: Name
    length: Count | None = None


class JoinPieces(StrictModel):
    axis: Annotated[int, Field(ge=1, le=7)]
    pieces: Annotated[list[Join], Field(min_length=2, max_length=16)]
    width: Dim | None = None


Join = Annotated[
    Annotated[JoinLeaf, Tag("leaf")] | Annotated[JoinPieces, Tag("pieces")],
    Discriminator(lambda v: "leaf" if isinstance(v, dict | JoinLeaf) and "part" in v else "pieces"),
]


class _Bound(StrictModel):
    name: Name
    dtype: DType
    shape: Shape


class LatentsInput(_Bound):
    source: Literal["latents"]
    repeat: Annotated[int, Field(ge=1, le=64)]


class TimestepInput(_Bound):
    source: Literal["timestep"]
    factor: Coef


class TextInput(_Bound):
    source: Literal["text", "mask"]
    part: Name
    output: Name
    order: Order


class JoinedInput(_Bound):
    source: Literal["joined"]
    join: Join
    order: Order


class LabelInput(_Bound):
    source: Literal["label"]
    order: Order


class ConstantInput(_Bound):
    source: Literal["constant"]


Binding = Annotated[LatentsInput | TimestepInput | TextInput | JoinedInput | LabelInput | ConstantInput,
                    Field(discriminator="source")]  # fmt: skip


class Call(StrictModel):
    inputs: Annotated[list[Binding], Field(min_length=1, max_length=64)]
    values: dict[Name, Text] = Field(default_factory=dict)


class Pipeline(StrictModel):
    """A diffusers pipeline at the edge: its text parts, transformer calls per step, CFG, VAE."""

    class_: Name = Field(alias="class")
    negative_prompt: Text
    calls: Annotated[list[Call], Field(min_length=1, max_length=8)]
    split: Dim | None
    cfg: Literal["none", "uncond,cond", "cond,uncond"]
    guidance: Coef | None
    text: Annotated[list[TextPart], Field(max_length=8)]
    labels: Labels | None = None
    vae: Vae | None
    denoiser: BuildFile | None


def text_outputs(part: TextPart) -> set[str]:
    """The names a binding may read of a text part (runtime.pipeline_loop.text_output)."""
    names = {*part.outputs, "attention_mask", "mask"}
    if "attention_mask" in part.inputs:
        names |= {f"{o}:unmasked" for o in part.outputs}
    return names | {f"{o}:zeroed" for o in names - {"attention_mask", "mask"}}


def _leaves(join: JoinLeaf | JoinPieces) -> list[JoinLeaf]:
    return [join] if isinstance(join, JoinLeaf) else [leaf for p in join.pieces for leaf in _leaves(p)]


def _depth(join: JoinLeaf | JoinPieces) -> int:
    return 0 if isinstance(join, JoinLeaf) else 1 + max(_depth(p) for p in join.pieces)


def pipeline_problem(p: Pipeline, latent_shape: list[int]) -> str | None:
    """The first inconsistency within a pipeline block (None: none)."""
    parts = {t.name: t for t in p.text}
    if len(parts) != len(p.text):
        return "pipeline.text names a part twice"
    if p.cfg != "none" and p.guidance is None:
        return f"pipeline.cfg is {p.cfg!r} without a guidance scale"
    for k, call in enumerate(p.calls):
        for b in call.inputs:
            where = f"pipeline.calls[{k}] input {b.name!r}"
            if isinstance(b, LatentsInput) and b.repeat * math.prod(latent_shape) > MAX_ELEMENTS:
                return f"{where} repeats the latents {b.repeat} times: more than {MAX_ELEMENTS} elements"
            if isinstance(b, TimestepInput) and math.prod(b.shape) > MAX_TIMESTEPS:
                return f"{where} is a timestep of shape {b.shape}, more than {MAX_TIMESTEPS} values"
            if isinstance(b, JoinedInput) and _depth(b.join) > MAX_JOIN_DEPTH:
                return f"{where} joins text outputs {_depth(b.join)} levels deep, more than {MAX_JOIN_DEPTH}"
            reads = [(b.part, b.output)] if isinstance(b, TextInput) else []
            reads += [(leaf.part, leaf.output) for leaf in _leaves(b.join)] if isinstance(b, JoinedInput) else []
            for part, output in reads:
                if part not in parts or output not in text_outputs(parts[part]):
                    return f"{where} reads {part!r} output {output!r}, which no text part gives"
            if isinstance(b, LabelInput) and (p.labels is None or math.prod(b.shape) != len(b.order.split(","))):
                return f"{where} is a class label of shape {b.shape} for order {b.order!r} (labels: {p.labels})"
    return _vae(p.vae)


def _vae(v: Vae | None) -> str | None:
    if v is None:
        return None
    if v.layout == "packed" and (v.height is None or v.width is None or v.height % 2 or v.width % 2):
        return "pipeline.vae with packed latents needs an even height and width"
    if v.layout == "video_packed" and (v.grid is None or v.patch_size is None or v.patch_size_t is None):
        return "pipeline.vae with packed video latents needs grid, patch_size and patch_size_t"
    if v.scaling_factor == 0:
        return "pipeline.vae.scaling_factor is 0"
    if v.latents_mean is not None and v.latents_std is not None and len(v.latents_mean) != len(v.latents_std):
        return "pipeline.vae's latents_mean and latents_std differ in length"
    return None
