"""The build recipe: the one declarative input of ``qexport build`` and its record in the manifest.

A frozen dataclass tree (bits, granularity, target, calibration replay, how a pipeline's text and
VAE parts store their weights, an ordered list of technique configs), serialised generically
(qexport.serial: a ``_type`` per technique, a ``version``), read from and written to YAML, checked
by ``validate()`` — every rule about which options combine lives here or in the technique's own
``check``. Presets ship in ``recipes/``.
"""

from __future__ import annotations

import dataclasses
import enum
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from qexport import serial
from qexport.errors import QexportError
from qexport.passes.techniques import ORDER, TECHNIQUES, Shape, Technique

VERSION = 1
PRESETS = Path(__file__).parent / "recipes"


@dataclass(frozen=True, kw_only=True)
class Bits:
    weights: int = 8  # 2..8 (stored as int8 / int4 containers)
    activations: int = 8  # 4..16 (uint8 / uint16 containers)


@dataclass(frozen=True, kw_only=True)
class Granularity:
    time_ranges: int | None = None  # None: one model per denoising step (TSW); K: K contiguous step ranges


class Scoring(enum.Enum):
    """The precision of the simulated forward passes that score a search's candidates (alpha,
    activation ranges) on a GPU. The FP references, the layer inputs GPTQ and the observers read,
    and every emitted value stay exact fp32 either way; on the CPU both are fp32."""

    FP32 = "fp32"  # matmuls in full fp32 (TF32 off)
    TF32 = "tf32"  # matmuls on the tensor cores in TF32 (10-bit mantissa inputs, fp32 sums)


@dataclass(frozen=True, kw_only=True)
class Replay:
    prompts: int | None = None  # calibration prompts the replaying techniques replay (None: up to 2)
    scoring: Scoring = Scoring.FP32  # the candidates' scoring forwards on a GPU build (build --device cuda)


class PartPrecision(enum.Enum):
    """How a pipeline build stores the weights of its text encoder and VAE decoder parts (the
    computation stays FP32 in all three)."""

    FP16 = "fp16"  # weights stored in float16, cast to float32 where they are read
    FP32 = "fp32"  # as exported
    INT8_WEIGHTS = "int8-weights"  # MatMul / Gemm / Conv weights int8 per output channel, the rest as fp16


@dataclass(frozen=True, kw_only=True)
class Parts:
    precision: PartPrecision = PartPrecision.FP16  # a pipeline build's text and VAE parts; built-ins have none


class FloatWeights(enum.Enum):
    """How the denoiser stores the weights of the layers it keeps in float (adaLN modulation,
    embedders, projections, label tables); their computation stays float either way."""

    AUTO = "auto"  # what the target takes best (its profile's float_weights, first entry)
    FP32 = "fp32"  # as the model has them
    INT8 = "int8"  # int8 per output channel, widened by Cast + Mul(scale) (weight-only; passes.weight_only)


@dataclass(frozen=True, kw_only=True)
class FloatLayers:
    weights: FloatWeights = FloatWeights.AUTO


@dataclass(frozen=True, kw_only=True)
class Recipe:
    """Everything a build does, and nothing about where its files go."""

    version: int = VERSION
    description: str = ""
    bits: Bits = field(default_factory=Bits)
    granularity: Granularity = field(default_factory=Granularity)
    target: str = "ort-cpu"
    replay: Replay = field(default_factory=Replay)
    parts: Parts = field(default_factory=Parts)
    float_layers: FloatLayers = field(default_factory=FloatLayers)
    techniques: tuple[Technique, ...] = ()

    def technique(self, kind: str) -> Technique | None:
        """The config of one technique, or None when the recipe does not use it."""
        return next((t for t in self.techniques if t.kind == kind), None)

    def replaying(self) -> list[str]:
        """The kinds of the techniques that replay calibration prompts."""
        return [t.kind for t in self.techniques if t.replays()]

    def target_replays(self) -> bool:
        """Whether the recipe's target replays calibration prompts for its emission (the output ranges
        of closed linears, the ranges of an integer-only graph)."""
        from qexport.targets.catalog import PROFILES

        target = PROFILES.get(self.target)
        return target is not None and (target.closed_linears or target.integer_activations is not None)

    def float_weights(self) -> FloatWeights:
        """How the float-kept layers' weights are stored: the recipe's choice, or under auto its
        target's (fp32 for a target qexport does not know)."""
        from qexport.targets.catalog import PROFILES

        if self.float_layers.weights != FloatWeights.AUTO:
            return self.float_layers.weights
        target = PROFILES.get(self.target)
        return FloatWeights(target.float_weights[0]) if target is not None else FloatWeights.FP32

    def validate(self) -> Recipe:
        """Check every rule that involves more than one key; returns self.

        Raises:
            QexportError: naming the recipe key, what it must be and what it was.
        """
        if self.version != VERSION:
            raise QexportError(f"recipe key 'version' must be {VERSION} (this qexport's recipes), got {self.version}")
        if not 2 <= self.bits.weights <= 8:
            raise QexportError(f"recipe key 'bits.weights' must be in 2..8, got {self.bits.weights}")
        if not 4 <= self.bits.activations <= 16:
            raise QexportError(f"recipe key 'bits.activations' must be in 4..16, got {self.bits.activations}")
        ranges = self.granularity.time_ranges
        if ranges is not None and ranges < 1:
            raise QexportError(
                f"recipe key 'granularity.time_ranges' must be 1 or more (or null: per step), got {ranges}"
            )
        self._check_float_weights()
        kinds = [t.kind for t in self.techniques]
        twice = sorted({k for k in kinds if kinds.count(k) > 1})
        if twice:
            raise QexportError(f"recipe key 'techniques' lists {twice[0]!r} twice; keep one")
        shape = Shape(w_bits=self.bits.weights, a_bits=self.bits.activations, per_step=ranges is None,
                      techniques=dict(zip(kinds, self.techniques, strict=True)))  # fmt: skip
        for t in self.techniques:
            t.check(shape)
        if self.replay.prompts is not None:
            if self.replay.prompts < 1:
                raise QexportError(f"recipe key 'replay.prompts' must be 1 or more, got {self.replay.prompts}")
            if not self.replaying() and not self.target_replays():
                can = ", ".join(t.kind for t in ORDER if t.replays is not Technique.replays)
                raise QexportError(
                    "recipe key 'replay.prompts' sets how many calibration prompts the replaying techniques use "
                    f"({can}), or a target whose emission replays them (qnn-htp's output ranges); the recipe "
                    "has neither"
                )
        if self.replay.scoring is not Scoring.FP32 and not self.replaying():
            raise QexportError(
                "recipe key 'replay.scoring' sets the precision of the searches' scoring passes; the recipe has "
                "no technique that replays calibration prompts (remove the key, or add a search)"
            )
        return self

    def _check_float_weights(self) -> None:
        from qexport.targets.catalog import PROFILES

        target, chosen = PROFILES.get(self.target), self.float_layers.weights
        if target is not None and chosen != FloatWeights.AUTO and chosen.value not in target.float_weights:
            raise QexportError(
                f"recipe key 'float_layers.weights' is {chosen.value}, which target {target.name} does not take; "
                f"it takes {' or '.join(target.float_weights)} (or auto)"
            )

    def settings(self) -> dict[str, Any]:
        """The build settings of every technique, merged in the registry's fixed order."""
        merged: dict[str, Any] = {}
        for kind in (t.kind for t in ORDER):
            chosen = self.technique(kind)
            if chosen is not None:
                merged.update(chosen.settings())
        return merged

    def to_dict(self) -> dict[str, Any]:
        """Plain data (the manifest's ``recipe``, the YAML file), techniques in the registry's order."""
        ordered = dataclasses.replace(self, techniques=tuple(sorted(self.techniques, key=_rank)))
        data: dict[str, Any] = serial.to_dict(ordered)
        return data

    @classmethod
    def from_dict(cls, data: Any) -> Recipe:
        """A validated recipe from plain data.

        Raises:
            QexportError: an unknown key, a missing key, a wrong type or a rule broken (names the key).
        """
        recipe: Recipe = serial.from_dict(cls, data, dict(TECHNIQUES))
        return recipe.validate()


def _rank(t: Technique) -> int:
    return [c.kind for c in ORDER].index(t.kind)


def load_recipe(name_or_path: str) -> Recipe:
    """A preset by name (``qexport recipes`` lists them) or a YAML file.

    Raises:
        QexportError: no such preset or file, a file that is not YAML, or an invalid recipe.
    """
    path = Path(name_or_path)
    if not path.suffix:
        path = PRESETS / f"{name_or_path}.yaml"
        if not path.is_file():
            raise QexportError(
                f"no recipe preset {name_or_path!r}; presets: {', '.join(preset_names())} (or a .yaml file)"
            )
    if not path.is_file():
        raise QexportError(f"recipe file {path} does not exist")
    try:
        data = yaml.safe_load(path.read_text())
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise QexportError(f"recipe file {path} is not valid YAML: {str(exc).splitlines()[0]}") from None
    try:
        return Recipe.from_dict(data)
    except QexportError as exc:
        raise QexportError(f"{path}: {exc}") from None


def dump_recipe(recipe: Recipe, path: Path) -> None:
    """Write the recipe as YAML (atomically)."""
    from qexport.media import atomic_write

    text = yaml.safe_dump(recipe.to_dict(), sort_keys=False)
    atomic_write(Path(path), lambda p: Path(p).write_text(text))


def preset_names() -> list[str]:
    return sorted(p.stem for p in PRESETS.glob("*.yaml"))


def with_settings(recipe: Recipe, assignments: list[str]) -> Recipe:
    """The recipe with ``--set KEY=VALUE`` assignments applied, validated.

    KEY is a dotted recipe key (``bits.weights``, ``granularity.time_ranges``, ``target``) or
    ``TECHNIQUE.FIELD`` (the technique is added with its defaults if absent); ``TECHNIQUE=on``
    adds a technique, ``TECHNIQUE=off`` removes it. VALUE is read as a YAML scalar (8, 0.5, null,
    auto).

    Raises:
        QexportError: a malformed assignment, an unknown key or technique, an invalid result.
    """
    data = recipe.to_dict()
    for text in assignments:
        key, sep, raw = text.partition("=")
        if not sep or not key:
            raise QexportError(f"--set takes KEY=VALUE (e.g. bits.weights=4), got {text!r}")
        try:
            value = yaml.safe_load(raw) if raw else None
        except yaml.YAMLError:
            value = raw
        _assign(data, key.strip(), value)
    return Recipe.from_dict(data)


def _assign(data: dict[str, Any], key: str, value: Any) -> None:
    head, _, rest = key.partition(".")
    if head in TECHNIQUES:
        techniques = data.setdefault("techniques", [])
        entry = next((t for t in techniques if t.get(serial.TYPE_KEY) == head), None)
        if not rest:
            if value in (True, "on") and entry is None:
                techniques.append({serial.TYPE_KEY: head})
            elif value in (False, "off"):
                data["techniques"] = [t for t in techniques if t.get(serial.TYPE_KEY) != head]
            elif value not in (True, "on"):
                raise QexportError(f"--set {key}= takes on or off, got {value!r}")
            return
        if entry is None:
            entry = {serial.TYPE_KEY: head}
            techniques.append(entry)
        entry[rest] = value
        return
    node = data
    parts = key.split(".")
    for part in parts[:-1]:
        child = node.get(part)
        if not isinstance(child, dict):
            raise QexportError(f"unknown recipe key {key!r}; techniques: {', '.join(TECHNIQUES)}")
        node = child
    if parts[-1] not in node or parts[-1] == "techniques":
        top, kinds = ", ".join(k for k in data if k != "techniques"), ", ".join(TECHNIQUES)
        raise QexportError(f"unknown recipe key {key!r}; top-level keys: {top}, or a technique: {kinds}")
    node[parts[-1]] = value


def recipe_of(*assignments: str, base: Recipe | None = None) -> Recipe:
    """A recipe from ``--set`` assignments over base (default: the empty recipe), validated."""
    return with_settings(base or Recipe(), list(assignments))


def basic_recipe(
    *, w_bits: int = 8, a_bits: int = 8, smooth: str = "none", alpha: float = 0.5, time_ranges: int | None = None
) -> Recipe:
    """The recipe of the method's basic grid (bits, SmoothQuant mode none / asq / tsq, models),
    as sweeps and benchmarks build it."""
    ranges = "null" if time_ranges is None else time_ranges
    smoothing = [] if smooth == "none" else [f"smoothquant.mode={smooth}", f"smoothquant.alpha={alpha}"]
    return recipe_of(f"bits.weights={w_bits}", f"bits.activations={a_bits}", f"granularity.time_ranges={ranges}",
                     *smoothing)  # fmt: skip
