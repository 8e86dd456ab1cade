"""The .qstats file as declarative rules: the header's schema (every key calibration writes, typed
and bounded), the tensors a header implies (names, dtypes, shapes) and the rules their values keep.

Fields the code reads (steps, model_id, config_hash, layers, cfg, prompt_texts, shard, call, ...)
are typed strictly; records kept for people (the scheduler, the transformer's inputs) are bounded
JSON. Every rule names the field it refuses; ``store`` applies them on every save and load.
"""

from __future__ import annotations

import hashlib
from typing import Annotated, Literal

import numpy as np
from pydantic import ConfigDict, Field, JsonValue, StringConstraints, ValidationInfo, field_validator
from qexport.calib.stats import HIST_BINS, MOMENTUM, LayerStats

from qexport.schema import Open, Strict

FORMAT = "qexport.qstats"
VERSION = 2
MAX_STEPS = 10_000
MAX_LAYERS = 100_000
MAX_CHANNELS = 1 << 16  # widest DiT linear input today: 13824 (Wan 14B's feed-forward)
MAX_PROMPTS = 100_000
MAX_SEEDS = 10_000
MAX_SHARDS = 10_000
MAX_TEXT = 10_000  # one prompt, a model id (a folder path) or a note
MAX_NAME = 512  # a layer's module path
MAX_SAMPLES = 10**12

Name = Annotated[str, StringConstraints(min_length=1, max_length=MAX_NAME, pattern=r"^[A-Za-z0-9_.\-]+$")]
Identifier = Annotated[str, StringConstraints(max_length=200, pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")]  # a class name
Key = Annotated[str, StringConstraints(min_length=1, max_length=200)]
Text = Annotated[str, StringConstraints(max_length=MAX_TEXT)]
Line = Annotated[str, StringConstraints(min_length=1, max_length=MAX_TEXT, pattern=r"^[^\x00-\x1f\x7f]+$")]
Hex16 = Annotated[str, StringConstraints(pattern=r"^[0-9a-f]{16}$")]
Sha256 = Annotated[str, StringConstraints(pattern=r"^[0-9a-f]{64}$")]
Feature = Annotated[int, Field(ge=1, le=MAX_CHANNELS)]
Seed = Annotated[int, Field(ge=0, le=2**64 - 1)]
ShardNumber = Annotated[int, Field(ge=0, le=MAX_SHARDS)]


class _Checked(Strict):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True, allow_inf_nan=False)


class LayerInfo(_Checked):
    """A hooked linear: its input width (the statistics' channels) and output width."""

    in_features: Feature
    out_features: Feature


class SchedulerInfo(Open):
    """The scheduler the calibration sampled with: its class and config (built-in models), or the
    probed step block (pipelines; the build probes the folder again rather than reading it)."""

    model_config = ConfigDict(extra="allow", strict=True, frozen=True, allow_inf_nan=False)

    class_name: Identifier = Field(alias="class")
    config: dict[Key, JsonValue] = Field(max_length=256)


class Header(_Checked):
    """What every version-2 .qstats header holds (the "qexport" metadata key); a calibration of a
    built-in model adds ``BuiltinHeader``'s fields, one through a pipeline ``PipelineHeader``'s."""

    format: Literal["qexport.qstats"]
    version: Literal[2]
    tool_version: Annotated[str, StringConstraints(max_length=64, pattern=r"^[0-9A-Za-z.+\-]+$")]
    model_id: Line
    class_name: Identifier
    config_hash: Hex16
    steps: int = Field(ge=1, le=MAX_STEPS)
    scheduler: SchedulerInfo
    prompts_hash: Annotated[str, StringConstraints(pattern=r"^[0-9a-f]{16}(\+[0-9a-f]{16})*$", max_length=17 * 1024)]
    prompts: int = Field(ge=1, le=MAX_PROMPTS)
    prompt_texts: list[Text] | None = Field(default=None, min_length=1, max_length=MAX_PROMPTS)  # may be left out
    seeds: list[Seed] = Field(min_length=1, max_length=MAX_SEEDS)
    samples: int = Field(ge=0, le=MAX_SAMPLES)
    shard: list[ShardNumber] | None = Field(min_length=2, max_length=MAX_SHARDS + 1)  # [index, ..., count]
    momentum: float
    histograms: bool
    hist_bins: int
    layers: dict[Name, LayerInfo] = Field(min_length=1, max_length=MAX_LAYERS)
    excluded: list[Name] = Field(max_length=MAX_LAYERS)
    tensors: dict[Annotated[str, StringConstraints(max_length=MAX_NAME + 16)], Sha256] = Field(
        max_length=10 * MAX_LAYERS
    )

    @field_validator("prompt_texts", mode="before")
    @classmethod
    def _absent_not_null(cls, value: object) -> object:
        if value is None:
            raise ValueError("may be left out, but not null")
        return value

    @field_validator("prompt_texts")
    @classmethod
    def _the_prompts(cls, value: list[str] | None, info: ValidationInfo) -> list[str] | None:
        """One text per prompt counted, and (unless merged from parts on other prompts) the hashed ones."""
        if value is None:
            return value
        if "prompts" in info.data and len(value) != info.data["prompts"]:
            raise ValueError(f"needs the {info.data['prompts']} prompts counted by 'prompts', has {len(value)}")
        digest = hashlib.sha256("\n".join(value).encode("utf-8", "surrogatepass")).hexdigest()[:16]
        taken = info.data.get("prompts_hash")  # absent here when it failed its own check
        if taken is not None and "+" not in taken and taken != digest:
            raise ValueError(f"are not the prompts 'prompts_hash' {taken} was taken of (their hash is {digest})")
        return value

    @field_validator("shard")
    @classmethod
    def _shard_indices(cls, value: list[int] | None) -> list[int] | None:
        """[index, ..., count]: the shard indices a file holds (distinct, below count) and their count."""
        if value is None:
            return value
        *indices, count = value
        if count < 1 or any(i >= count for i in indices) or len(set(indices)) != len(indices):
            raise ValueError(f"must be distinct shard indices below the shard count {count}, then the count")
        return value

    @field_validator("momentum")
    @classmethod
    def _this_momentum(cls, value: float) -> float:
        if value != MOMENTUM:
            raise ValueError(f"must be {MOMENTUM}, the running average's momentum this qexport merges")
        return value

    @field_validator("timesteps", check_fields=False)  # declared by each kind of header
    @classmethod
    def _one_per_step(cls, value: list[float], info: ValidationInfo) -> list[float]:
        if "steps" in info.data and len(value) != info.data["steps"]:
            raise ValueError(f"needs one timestep per step ({info.data['steps']}), has {len(value)}")
        return value

    @field_validator("hist_bins")
    @classmethod
    def _bins(cls, value: int, info: ValidationInfo) -> int:
        want = HIST_BINS if info.data.get("histograms") else 0
        if value != want:
            raise ValueError(f"must be {want} with histograms {'on' if want else 'off'}")
        return value


class BuiltinHeader(Header):
    """A calibration through qexport's own sampling loop (``calib.run``)."""

    timesteps: list[Annotated[int, Field(ge=0, le=10**6)]] = Field(min_length=1, max_length=MAX_STEPS)
    cfg: float = Field(ge=0, le=1000)
    batch_size: int = Field(ge=1, le=MAX_PROMPTS)
    autocast: Literal["float32", "float16", "bfloat16"]


class PipelineHeader(Header):
    """A calibration through a diffusers pipeline's own ``__call__`` (``calib.pipeline``)."""

    pipeline: Identifier
    timesteps: list[Annotated[float, Field(ge=-1e9, le=1e9)]] = Field(min_length=1, max_length=MAX_STEPS)
    transformer_calls: list[JsonValue] = Field(max_length=64)
    call: dict[Key, JsonValue] = Field(max_length=256)  # the build binds the pipeline with these arguments
    noise: Text


def header_model(header: dict[str, object]) -> type[Header]:
    """The schema a header is checked against: a pipeline calibration's names its pipeline."""
    return PipelineHeader if "pipeline" in header else BuiltinHeader


class SafetensorsEntry(_Checked):
    """One entry of the safetensors tensor table (checked before the library reads the data)."""

    dtype: Annotated[str, StringConstraints(max_length=8)]
    shape: list[Annotated[int, Field(ge=0, le=1 << 40)]] = Field(max_length=4)
    data_offsets: list[Annotated[int, Field(ge=0, le=1 << 62)]] = Field(min_length=2, max_length=2)


class Metadata(_Checked):
    """The safetensors metadata of a .qstats file: the header's JSON text and its digest."""

    qexport: str
    qexport_sha256: Sha256 | None = None  # absent in version-1 files


# ---- the tensors: names, dtypes and shapes a header implies, and the rules their values keep ----

MAX_COUNT = 1 << 40  # samples of one step: far past any calibration, and a sum over steps fits in int64
MAX_BIN = 1 << 53  # entries of one histogram bin (samples x tokens x channels), exact in float64
FIELDS: dict[str, str] = {"min": "float32", "max": "float32", "channel_min": "float32", "channel_max": "float32",
                          "absmax_sum": "float64", "count": "int64", "asq_z": "float64", "asq_n": "int64"}  # fmt: skip
HIST_FIELDS: dict[str, str] = {"hist": "int64", "hist_range": "float64"}
SAFETENSORS_DTYPES = {"float32": "F32", "float64": "F64", "int64": "I64"}


def layer_tensors(steps: int, channels: int, histograms: bool) -> dict[str, tuple[str, tuple[int, ...]]]:
    """field -> (numpy dtype name, shape) of one layer's tensors (see LayerStats)."""
    shapes = {"min": (steps,), "max": (steps,), "channel_min": (steps, channels), "channel_max": (steps, channels),
              "absmax_sum": (steps, channels), "count": (steps,), "asq_z": (channels,), "asq_n": (1,)}  # fmt: skip
    out = {f: (FIELDS[f], shape) for f, shape in shapes.items()}
    if histograms:
        out |= {"hist": (HIST_FIELDS["hist"], (steps, HIST_BINS)), "hist_range": (HIST_FIELDS["hist_range"], (steps,))}
    return out


def layout(header: Header) -> dict[str, tuple[str, tuple[int, ...]]]:
    """Every tensor a file with this header holds: "<layer>::<field>" -> (dtype, shape)."""
    out = {}
    for name, info in header.layers.items():
        for field, spec in layer_tensors(header.steps, info.in_features, header.histograms).items():
            out[f"{name}::{field}"] = spec
    return out


def _at(mask: np.ndarray, axes: tuple[str, ...] = ("step", "channel")) -> str:
    """Where the first True of mask is: "step 2" or "step 2, channel 17"."""
    index = [int(i) for i in np.argwhere(mask)[0]]
    return ", ".join(f"{axis} {i}" for axis, i in zip(axes[: mask.ndim], index, strict=True))


def problem(s: LayerStats) -> str | None:
    """The first rule one layer's statistics break, as "'<field>' at step i ...", or None.

    An empty step (count 0: no sample reached the layer) holds min +inf, max -inf, zero sums and
    an empty histogram of range 0, which merges exactly; every other value is finite.
    """
    count = s.count
    if (bad := (count < 0) | (count > MAX_COUNT)).any():
        return f"'count' at {_at(bad)} is {count[bad][0]}, not a sample count (0..2**40)"
    empty, full = count == 0, count > 0
    extremes = {"min": (s.minimum, np.inf), "max": (s.maximum, -np.inf), "channel_min": (s.channel_min, np.inf),
                "channel_max": (s.channel_max, -np.inf), "absmax_sum": (s.absmax_sum, 0.0)}  # fmt: skip
    for field, (a, none) in extremes.items():
        rows = full if a.ndim == 1 else full[:, None]
        if (bad := rows & ~np.isfinite(a)).any():
            return f"'{field}' at {_at(bad)} is {a[bad][0]}, not a finite number"
        if (bad := ~rows & (a != none)).any():
            return f"'{field}' at {_at(bad)} is {a[bad][0]}, but the step has no samples ('count' 0: {none} there)"
    if (bad := s.absmax_sum < 0).any():
        return f"'absmax_sum' at {_at(bad)} is {s.absmax_sum[bad][0]}, below 0 (a sum of |x|)"
    if (bad := full & (s.minimum > s.maximum)).any():
        return f"'min' at {_at(bad)} is {s.minimum[bad][0]}, above 'max' {s.maximum[bad][0]}"
    if (bad := full[:, None] & (s.channel_min > s.channel_max)).any():
        return f"'channel_min' at {_at(bad)} is {s.channel_min[bad][0]}, above 'channel_max' {s.channel_max[bad][0]}"
    if (bad := full & (s.minimum != s.channel_min.min(1))).any():
        return f"'min' at {_at(bad)} is {s.minimum[bad][0]}, not the least 'channel_min' {s.channel_min.min(1)[bad][0]}"
    if (bad := full & (s.maximum != s.channel_max.max(1))).any():
        return (
            f"'max' at {_at(bad)} is {s.maximum[bad][0]}, not the greatest 'channel_max' {s.channel_max.max(1)[bad][0]}"
        )
    return _asq_problem(s) or _hist_problem(s, empty)


def _asq_problem(s: LayerStats) -> str | None:
    if not 0 <= s.asq_n <= int(s.count.sum()):
        return f"'asq_n' is {s.asq_n}, not a count of updates (0..{int(s.count.sum())}, the samples)"
    if (bad := ~np.isfinite(s.asq_z) | (s.asq_z < 0)).any():
        return f"'asq_z' at {_at(bad, ('channel',))} is {s.asq_z[bad][0]}, not a finite mean of |x|"
    if s.asq_n == 0 and (s.asq_z != 0).any():
        return "'asq_z' is not zero, but 'asq_n' counts no update"
    return None


def _hist_problem(s: LayerStats, empty: np.ndarray) -> str | None:
    if s.hist is None or s.hist_range is None:
        return None
    hist, rng = s.hist, s.hist_range
    if (bad := (hist < 0) | (hist > MAX_BIN)).any():
        return f"'hist' at {_at(bad, ('step', 'bin'))} is {hist[bad][0]}, not a bin count (0..2**53)"
    if (bad := ~np.isfinite(rng) | (rng < 0)).any():
        return f"'hist_range' at {_at(bad)} is {rng[bad][0]}, not a finite range >= 0"
    mantissa = np.frexp(rng)[0]
    if (bad := ~empty & ((rng <= 0) | (mantissa != 0.5))).any():
        return f"'hist_range' at {_at(bad)} is {rng[bad][0]}, not a power of two above 0 (merging doubles it)"
    if (bad := empty & ((rng != 0) | (hist != 0).any(1))).any():
        return f"'hist_range' at {_at(bad)} is {rng[bad][0]} with a non-empty histogram, but the step has no samples"
    return None
