"""The schema of manifest.json (schema 4), as pydantic models over qexport.schema's Strict / Open
bases: every entry the edge loop, verification and the reports act on is typed and bounded (counts,
shapes, dtypes, file names, finite coefficients; the pipeline block in runtime.pipeline_schema);
records kept for people (quantization details, search scores, verification figures) are Open.
``problem`` adds the checks across entries (steps against ranges and the scheduler, inputs against
the latent shape). Reading is runtime.manifest."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import Field

from qexport.runtime.pipeline_schema import Pipeline, pipeline_problem
from qexport.runtime.schema_types import (
    MAX_BYTES,
    MAX_ENTRIES,
    MAX_FILES,
    MAX_PATH,
    MAX_STEPS,
    SEGMENT,
    BuildFile,
    Coef,
    Count,
    DType,
    Hex64,
    Index,
    Info,
    Name,
    Shape,
    Term,
    Text,
    Timestep,
)
from qexport.schema import Open
from qexport.schema import Strict as StrictModel

SCHEMA = 4
MAX_MANIFEST_BYTES = 32 << 20  # the largest builds' manifests are a few MiB (ranges x layers of records)


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
    binaries: Annotated[dict[Annotated[str, Field(pattern=SEGMENT.pattern, max_length=MAX_PATH)], Count],
                        Field(max_length=MAX_STEPS)]  # fmt: skip
    sdk: Annotated[str, Field(max_length=64)]
    loaded: Literal[True] | Text
    max_abs_diff: dict[BuildFile, Annotated[float, Field(allow_inf_nan=False)]] = Field(default_factory=dict)


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


def _pipeline(m: Manifest) -> str | None:
    return None if m.pipeline is None else pipeline_problem(m.pipeline, m.latent_shape)


def _contexts(m: Manifest) -> str | None:
    c = m.contexts
    if c is None:
        return None
    if m.ranges is None or len(c.models) != len(m.ranges):
        return f"contexts names {len(c.models)} context models for {len(m.ranges or [])} ranges"
    if (bad := next((f for f in c.models if not f.startswith(f"{c.folder}/")), None)) is not None:
        return f"context model {bad} is not in the contexts folder {c.folder!r}"
    return None
