"""The schema of manifest.json (schema 4), as pydantic models over qexport.schema's Strict / Open
bases: every entry the edge loop, verification and the reports act on is typed and bounded (counts,
shapes, dtypes, file names, finite coefficients); records kept for people (quantization details,
search scores, verification figures) are Open. ``problems`` adds the checks across entries (steps
against ranges and the scheduler, inputs against the latent shape). Reading is runtime.manifest."""

from __future__ import annotations

import math
import re
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    Discriminator,
    Field,
    GetCoreSchemaHandler,
    GetJsonSchemaHandler,
    JsonValue,
    Strict,
    Tag,
)
from pydantic.json_schema import JsonSchemaValue
from pydantic_core import PydanticCustomError, core_schema

from qexport.schema import Open
from qexport.schema import Strict as StrictModel

SCHEMA = 4
MAX_MANIFEST_BYTES = 32 << 20  # the largest builds' manifests are a few MiB (ranges x layers of records)
MAX_STEPS = 1000  # denoising steps, and so ranges
MAX_FILES = 10_000  # files of one build folder
MAX_PATH = 200  # characters of a file name relative to the build folder
MAX_NAME = 256  # characters of a tensor, layer, class or part name
MAX_TEXT = 65_536  # characters of a free-text entry
MAX_ENTRIES = 1 << 17  # vocabulary words, class names, layer ids
MAX_ELEMENTS = 1 << 26  # elements of one tensor the edge loop allocates (256 MiB of float32)
MAX_DIM = 1 << 20
MAX_COEF = 1e6  # |coefficient|: sampler weights, CFG scale, VAE factors
MAX_TIMESTEP = 1e7
MAX_BYTES = 1 << 45  # one file
MAX_JOIN_DEPTH = 4  # joins of text outputs (SD3's are 2 deep)
MAX_TIMESTEPS = 4096  # values of a pipeline's timestep input (one per batch row)
PATH_PATTERN = r"^[A-Za-z0-9_][A-Za-z0-9_.+-]*(/[A-Za-z0-9_][A-Za-z0-9_.+-]*)*$"
_SEGMENT = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.+-]*$")


def path_problem(name: str) -> str | None:
    """Why `name` cannot name a file of a build folder (None: it can): it must be relative, without
    '..' or '.' segments, at most MAX_PATH characters of letters, digits, '_', '.', '+', '-' and '/'
    separators, no segment starting with '.' or '-'."""
    if not name:
        return "an empty file name"
    if len(name) > MAX_PATH:
        return f"a file name of {len(name)} characters, more than {MAX_PATH}"
    if name.startswith(("/", "\\")) or re.match(r"^[A-Za-z]:", name):
        return "an absolute path; a build names its files relative to its folder"
    parts = name.replace("\\", "/").split("/")
    if ".." in parts:
        return "a path with '..', which leaves the build folder"
    if not all(_SEGMENT.match(p) for p in parts):
        return "a file name with characters other than letters, digits, '_', '.', '+', '-' and '/' separators"
    return None


class BuildFile(str):
    """A file of the build named in the manifest: relative to the build folder and inside it
    (path_problem); read_manifest also resolves it (no symlink out) and checks its digest."""

    @classmethod
    def __get_pydantic_core_schema__(cls, source: Any, handler: GetCoreSchemaHandler) -> core_schema.CoreSchema:
        return core_schema.no_info_after_validator_function(cls._check, core_schema.str_schema(strict=True))

    @classmethod
    def __get_pydantic_json_schema__(
        cls, schema: core_schema.CoreSchema, handler: GetJsonSchemaHandler
    ) -> JsonSchemaValue:
        return {"type": "string", "maxLength": MAX_PATH, "pattern": PATH_PATTERN,
                "description": "a file of the build folder, relative to it"}  # fmt: skip

    @classmethod
    def _check(cls, value: str) -> BuildFile:
        if (why := path_problem(value)) is not None:
            raise PydanticCustomError("build_file", "{why}", {"why": why})
        return cls(value)


Name = Annotated[str, Field(min_length=1, max_length=MAX_NAME)]
Text = Annotated[str, Field(max_length=MAX_TEXT)]
Hex64 = Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")]
Count = Annotated[int, Field(ge=0, le=1 << 31)]
Index = Annotated[int, Field(ge=0, lt=MAX_STEPS)]
Dim = Annotated[int, Field(ge=1, le=MAX_DIM)]
Coef = Annotated[float, Field(allow_inf_nan=False, ge=-MAX_COEF, le=MAX_COEF)]
Timestep = Annotated[float, Field(allow_inf_nan=False, ge=-MAX_TIMESTEP, le=MAX_TIMESTEP)]


def _few_elements(shape: list[int]) -> list[int]:
    if math.prod(shape) > MAX_ELEMENTS:
        raise PydanticCustomError("too_large", "a tensor of {n} elements, more than {most}",
                                  {"n": math.prod(shape), "most": MAX_ELEMENTS})  # fmt: skip
    return shape


Shape = Annotated[list[Dim], Field(max_length=8), AfterValidator(_few_elements)]
DType = Literal["float32", "float16", "bfloat16", "float64", "int64", "int32", "int16", "int8", "uint8", "bool"]
Order = Literal["uncond,cond", "cond,uncond", "cond", "uncond"]
Term = Annotated[tuple[Index, Coef], Strict(False)]  # (step j, its coefficient): a JSON pair
Info = dict[str, JsonValue]  # an informational record, bounded by the file's size and nesting


class Tensor(StrictModel):
    """An input or output of the step models (batch 2: the conditional and unconditional rows)."""

    name: Name
    shape: Shape
    dtype: DType


class Step(StrictModel):
    index: Index
    timestep: Timestep
    range: Index
    model: BuildFile
    timestep_fixed: bool = False  # pipeline builds: the timestep is a constant inside the step's model


class SchedulerStep(StrictModel):
    """x[i+1] = sum(c * x[j] for j, c in x) + sum(c * out[j] for j, c in out) + noise * N(0, 1);
    the model sees input_scale * x[i] at timestep."""

    timestep: Timestep
    input_scale: Coef
    x: Annotated[list[Term], Field(max_length=MAX_STEPS)]
    out: Annotated[list[Term], Field(max_length=MAX_STEPS)]
    noise: Coef


class Scheduler(StrictModel):
    class_: Name = Field(alias="class")
    config: Info = Field(default_factory=dict)
    set_timesteps: Info = Field(default_factory=dict)
    init_noise_sigma: Coef
    steps: Annotated[list[SchedulerStep], Field(min_length=1, max_length=MAX_STEPS)]


class Range(Open):
    """One emitted model and the steps it serves; the rest (search scores, raised layers) informational."""

    index: Index
    steps: Annotated[list[Index], Field(min_length=1, max_length=MAX_STEPS)]
    model: BuildFile
    alpha: Coef


class Quantization(Open):
    w_bits: Annotated[int, Field(ge=1, le=32)]
    a_bits: Annotated[int, Field(ge=1, le=32)]


class TargetDevice(StrictModel):
    """The SoC a qnn-htp build assumes (QNN provider options)."""

    soc_model: Annotated[str, Field(pattern=r"^[0-9]{1,6}$")]
    htp_arch: Annotated[str, Field(pattern=r"^[0-9]{1,6}$")]
    float_ops: Literal["fp16"]


class Calibration(Open):
    prompts_hash: Annotated[str, Field(max_length=128)]
    file: Annotated[str, Field(max_length=4096)] = ""  # where the build read its .qstats (not a file of the build)


class Files(Open):
    weights: BuildFile
    weights_bytes: Annotated[int, Field(ge=0, le=MAX_BYTES)]


class FileRecord(StrictModel):
    bytes: Annotated[int, Field(ge=0, le=MAX_BYTES)]
    sha256: Hex64


class Integrity(StrictModel):
    """Every file of the build folder but manifest.json: its size and sha256, checked on every read."""

    algorithm: Literal["sha256"]
    files: Annotated[dict[BuildFile, FileRecord], Field(max_length=MAX_FILES)]


class Verification(Open):
    ok: bool


class Recipe(Open):
    version: Annotated[int, Field(ge=1, le=1000)]


class Legality(StrictModel):
    file: BuildFile
    models: Annotated[list[Info], Field(max_length=MAX_STEPS + 1)]


class CaptionConditioning(StrictModel):
    kind: Literal["caption"]
    model: BuildFile
    vocab: Annotated[list[Name], Field(min_length=1, max_length=MAX_ENTRIES)]
    max_tokens: Annotated[int, Field(ge=1, le=4096)]


class LabelConditioning(StrictModel):
    kind: Literal["label"]
    classes: Annotated[list[Name], Field(max_length=MAX_ENTRIES)]
    null: Annotated[int, Field(ge=0, le=MAX_ENTRIES)]


class ExternalConditioning(StrictModel):
    kind: Literal["external"]
    note: Text = ""


Conditioning = Annotated[CaptionConditioning | LabelConditioning | ExternalConditioning, Field(discriminator="kind")]


class Kv(Open):
    """kv.onnx (--precompute-kv): the cross-attention K/V computed once per prompt."""

    model: BuildFile
    inputs: Annotated[list[Tensor], Field(min_length=1, max_length=16)]
    outputs: Annotated[list[Tensor], Field(min_length=1, max_length=4096)]
    layers: Annotated[list[Name], Field(max_length=4096)]


class Contexts(StrictModel):
    """QNN context binaries (qexport contexts): one context model per range under `folder`."""

    mode: Literal["per-model", "shared"]
    folder: Annotated[str, Field(pattern=r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,63}$")]
    models: Annotated[list[BuildFile], Field(min_length=1, max_length=MAX_STEPS)]
    binaries: Annotated[dict[Annotated[str, Field(pattern=_SEGMENT.pattern, max_length=MAX_PATH)], Count],
                        Field(max_length=MAX_STEPS)]  # fmt: skip
    sdk: Annotated[str, Field(max_length=64)]
    loaded: Literal[True] | Text
    max_abs_diff: dict[BuildFile, Annotated[float, Field(allow_inf_nan=False)]] = Field(default_factory=dict)


# --- pipeline builds -------------------------------------------------------------------------------


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


# --- the manifest ----------------------------------------------------------------------------------


class Manifest(StrictModel):
    """manifest.json, schema 4: a build of qexport build (steps, ranges, inputs...), a pipeline build
    (and a `pipeline` block), or an FP pipeline export of qexport export-fp (pipeline, scheduler)."""

    schema_version: Literal[4]
    digest: Hex64
    integrity: Integrity
    tool_version: Annotated[str, Field(max_length=64)] = ""
    model_id: Name | None = None
    class_name: Name | None = None
    config_hash: Annotated[str, Field(max_length=128)] | None = None
    prediction_type: Name | None = None
    latent_shape: Annotated[Shape, Field(min_length=1, max_length=7)]
    pixel_latents: bool = False
    inputs: Annotated[list[Tensor], Field(min_length=2, max_length=3)] | None = None
    output: Tensor | None = None
    cfg: Coef | None = None
    steps: Annotated[list[Step], Field(min_length=1, max_length=MAX_STEPS)] | None = None
    scheduler: Scheduler
    ranges: Annotated[list[Range], Field(min_length=1, max_length=MAX_STEPS)] | None = None
    quantization: Quantization | None = None
    target: Name | None = None
    target_device: TargetDevice | None = None
    calibration: Calibration | None = None
    files: Files | None = None
    verification: Verification | None = None
    recipe: Recipe | None = None
    choices: Annotated[list[Info], Field(max_length=MAX_STEPS)] | None = None
    legality: Legality | None = None
    conditioning: Conditioning | None = None
    layer_ids: Annotated[dict[Name, Name], Field(max_length=MAX_ENTRIES)] | None = None
    attention_ids: Annotated[dict[Name, Name], Field(max_length=MAX_ENTRIES)] | None = None
    kv: Kv | None = None
    pipeline: Pipeline | None = None
    contexts: Contexts | None = None


def named_files(value: Any) -> list[BuildFile]:
    """Every file the validated manifest (or any part of it) names, in order of appearance."""
    if isinstance(value, BuildFile):
        return [value]
    if isinstance(value, StrictModel | Open):
        return [f for name in type(value).model_fields for f in named_files(getattr(value, name))]
    if isinstance(value, list | tuple):
        return [f for v in value for f in named_files(v)]
    if isinstance(value, dict):
        return [f for k, v in value.items() for f in (*named_files(k), *named_files(v))]
    return []


def problem(m: Manifest) -> str | None:
    """The first inconsistency between entries of a manifest that passed the schema (None: none)."""
    for check in (_kind, _tensors, _steps, _sampler, _pipeline, _contexts):
        if (why := check(m)) is not None:
            return why
    return None


def _kind(m: Manifest) -> str | None:
    needed: tuple[str, ...] = ("inputs", "output", "cfg", "steps", "ranges")
    if m.pipeline is not None:
        needed = ("steps", "ranges") if m.pipeline.denoiser is None else ()
    missing = [k for k in needed if getattr(m, k) is None]
    what = "a build of qexport build" if m.pipeline is None else "a pipeline build without one denoiser"
    return f"{what} needs {', '.join(repr(k) for k in missing)}, which it lacks" if missing else None


def _tensors(m: Manifest) -> str | None:
    if m.inputs is None or m.output is None:
        return None
    names = [t.name for t in m.inputs]
    if names not in (["latents", "cond"], ["latents", "cond", "timestep"]):
        return f"inputs are {names}; a build feeds ['latents', 'cond'] and optionally 'timestep'"
    batch = [2, *m.latent_shape]
    for where, t in (("inputs[0]", m.inputs[0]), ("output", m.output)):
        if t.shape != batch or t.dtype != "float32":
            return f"{where} is {t.dtype} {t.shape}; the latent shape {m.latent_shape} makes it float32 {batch}"
    if m.inputs[1].shape[:1] != [2] or m.inputs[1].dtype not in ("float32", "int64"):
        return f"inputs[1] ('cond') is {m.inputs[1].dtype} {m.inputs[1].shape}; it is float32 or int64, batch 2"
    if len(m.inputs) == 3 and (m.inputs[2].shape != [2] or m.inputs[2].dtype != "int64"):
        return f"inputs[2] ('timestep') is {m.inputs[2].dtype} {m.inputs[2].shape}; it is int64 [2]"
    return None


def _steps(m: Manifest) -> str | None:
    if m.steps is None or m.ranges is None:
        return None
    if len(m.scheduler.steps) != len(m.steps):
        return f"the scheduler block has {len(m.scheduler.steps)} steps and 'steps' {len(m.steps)}"
    for j, r in enumerate(m.ranges):
        if r.index != j:
            return f"ranges[{j}].index is {r.index}"
        if (bad := next((s for s in r.steps if s >= len(m.steps)), None)) is not None:
            return f"ranges[{j}] serves step {bad}; the build has steps 0..{len(m.steps) - 1}"
    for i, s in enumerate(m.steps):
        if s.index != i:
            return f"steps[{i}].index is {s.index}"
        if s.range >= len(m.ranges):
            return f"steps[{i}].range is {s.range}; the build has ranges 0..{len(m.ranges) - 1}"
        if s.model != m.ranges[s.range].model or i not in m.ranges[s.range].steps:
            return f"steps[{i}] (model {s.model}) and ranges[{s.range}] (model {m.ranges[s.range].model}) disagree"
    return None


def _sampler(m: Manifest) -> str | None:
    for i, s in enumerate(m.scheduler.steps):
        if not s.x and not s.out:
            return f"scheduler.steps[{i}] combines nothing (its x and out are empty)"
        if (j := next((j for j, _ in (*s.x, *s.out) if j > i), None)) is not None:
            return f"scheduler.steps[{i}] reads step {j}, a later one"
    return None


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


def _pipeline(m: Manifest) -> str | None:
    p = m.pipeline
    if p is None:
        return None
    parts = {t.name: t for t in p.text}
    if len(parts) != len(p.text):
        return "pipeline.text names a part twice"
    if p.cfg != "none" and p.guidance is None:
        return f"pipeline.cfg is {p.cfg!r} without a guidance scale"
    for k, call in enumerate(p.calls):
        for b in call.inputs:
            where = f"pipeline.calls[{k}] input {b.name!r}"
            if isinstance(b, LatentsInput) and b.repeat * math.prod(m.latent_shape) > MAX_ELEMENTS:
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


def _contexts(m: Manifest) -> str | None:
    c = m.contexts
    if c is None:
        return None
    if m.ranges is None or len(c.models) != len(m.ranges):
        return f"contexts names {len(c.models)} context models for {len(m.ranges or [])} ranges"
    if (bad := next((f for f in c.models if not f.startswith(f"{c.folder}/")), None)) is not None:
        return f"context model {bad} is not in the contexts folder {c.folder!r}"
    return None
