"""The data of planning: a build's resolved settings (QuantConfig), what one range plans per linear
(LayerPlan) and per range (RangePlan), the attention operands' quantizers, and the state one
group and one layer carry through the technique steps of passes.plan (GroupStep, LayerStep)."""

from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

import numpy as np
import torch
from qexport.calib.stats import LayerStats
from qexport.passes.analyze import Group
from qexport.passes.fp_weights import FPWeights
from qexport.passes.gptq import Gram, Hessian, Memo, Rounding
from qexport.passes.observe import Observer
from qexport.passes.quant import Grid, decode_codebook, dequantize, rows
from qexport.targets.profile import TargetProfile

from qexport.errors import QexportError

MIXED_HIGH_BITS = 8  # mixed precision: the width of the layers it raises


class Smooth(StrEnum):
    NONE = "none"
    ASQ = "asq"  # one s from the aggregated running average, all steps
    TSQ = "tsq"  # one s per time range


@dataclass(frozen=True, kw_only=True)
class QuantConfig:
    """The planning settings of a build, derived from its recipe (qexport.recipe), which checks them.
    `techniques` holds the recipe's technique configs by kind for the techniques that read their
    own config; the fields below are the resolved settings of the others (searched values included)."""

    w_bits: int = 8
    a_bits: int = 8
    smooth: Smooth = Smooth.NONE
    alpha: float = 0.5
    alpha_auto: bool = False  # search alpha (the build does it; alpha is then a start value)
    alpha_layer: bool = False  # alpha per input-sharing group, by layer-output error (exporter.alpha)
    asq_stat: str = "ema"  # ASQ's per-channel activation statistic: the running average, or the max over steps
    weight_clip: str = "minmax"  # or "mse": per-channel clip ratio searched for least squared error
    w_group: int = 0  # weights per group of this many input channels and output channel (0: per channel)
    act_observer: Observer = Observer.MINMAX  # per-tensor activation range rule (see passes.observe)
    act_shrink: float = 1.0  # every activation range is scaled by this (the search observer picks it)
    lowrank: int = 0  # rank of the FP error-compensation branch per linear (0 = none; see passes.lowrank)
    rotate: bool = False  # per-head Hadamard folded into value projection / attention output (passes.rotate)
    online_rotation: int = 0  # block size of an online block-diagonal Hadamard before other groups (0 = off)
    rotation_choice: str = "adaptive"  # online rotation: "adaptive" (outliers and lower error) or "all"
    rotation_transform: str = "hadamard"  # online rotation: "hadamard" blocks, or DuQuant's "duquant"
    quantize_attention: bool = False  # Q/DQ on both operands of QK^T and PV (passes.attention)
    mixed_precision: float = 0.0  # budget in weight bits per parameter: layers at w_bits or 8 (0 = off)
    weight_rounding: Rounding = Rounding.NEAREST  # or GPTQ: error-compensating rounding (passes.gptq)
    alpha_scoring: str = "nearest"  # with GPTQ: how an alpha search rounds its candidates (nearest or gptq)
    replay_prompts: int | None = None  # calibration prompts the replaying options replay (None: up to 2)
    smooth_ranges: int = 0  # TSQ: one s per this many contiguous step ranges, not per model (0 = per model)
    techniques: Mapping[str, Any] = field(default_factory=dict)  # kind -> the recipe's technique config

    def has(self, kind: str) -> bool:
        return kind in self.techniques


@dataclass(frozen=True, kw_only=True)
class ActQuant:
    """A per-tensor activation quantizer and the range it was made from."""

    scale: np.ndarray  # scalar float32
    zero: np.ndarray  # scalar, storage dtype
    grid: Grid
    lo: float
    hi: float


@dataclass(frozen=True, kw_only=True)
class AttentionPlan:
    """The quantizers of one attention module's matmul operands."""

    query: ActQuant
    key: ActQuant
    probs: ActQuant
    value: ActQuant

    def operand(self, name: str) -> ActQuant:
        return getattr(self, name)


@dataclass(kw_only=True)
class LayerPlan:
    """One linear, as built: final weight (W^T [in, out]) in integers, and how its input is treated."""

    w_q: np.ndarray
    w_scale: np.ndarray  # [out], or [in / g, out] per group of g input channels (group_weights)
    w_zero: np.ndarray  # the same shape
    w_grid: Grid
    a_scale: np.ndarray  # scalar
    a_zero: np.ndarray  # scalar
    a_grid: Grid
    divisor: np.ndarray | None  # the simulation divides the input by this (explicit or modulation fold)
    bias: np.ndarray | None = None  # a changed bias (value projection folded by the next linear)
    w_float: np.ndarray | None = None  # the smoothed FP weight before quantization (keep_float only)
    lowrank_a: np.ndarray | None = None  # [in, r] FP32: output += (x_dq · A) · B (--lowrank)
    lowrank_b: np.ndarray | None = None  # [r, out] FP32
    subtract: np.ndarray | None = None  # [in]: subtracted from the (divided) input before rotating
    rotation: np.ndarray | None = None  # online Hadamard R [in, in]: the input is x·R before quantizing
    o_scale: np.ndarray | None = None  # output quantizer (closed linears): scalar, on the grid a_grid
    o_zero: np.ndarray | None = None
    a_range: tuple[Any, Any] | None = None  # the input range before the shrink (passes.plan.with_shrink)
    dynamic: str | None = None  # "token" / "tensor": the input is quantized at run time (a_scale unused)
    codebook: np.ndarray | None = None  # [k, d]: w_q holds indices [in / d, out] into it (codebook_weights)
    levels: np.ndarray | None = None  # [k, out]: w_q holds each column's codes [in, out] into it (twin_log_weights)

    @property
    def coded(self) -> bool:
        """The weight is codes into a lookup (a codebook or per-channel levels), which no
        DequantizeLinear expresses: the graph decodes it with a Gather the runtime folds at load."""
        return self.codebook is not None or self.levels is not None

    @property
    def shape(self) -> tuple[int, int]:
        """W^T's (in, out)."""
        rows, cols = self.w_q.shape
        return rows * (1 if self.codebook is None else self.codebook.shape[1]), cols

    def weight(self) -> np.ndarray:
        if self.codebook is not None:
            return decode_codebook(self.codebook, self.w_q)
        if self.levels is not None:
            return np.take_along_axis(self.levels, self.w_q.astype(np.int64), axis=0)
        n = self.w_q.shape[0]
        return dequantize(self.w_q, rows(self.w_scale, n), rows(self.w_zero, n))


@dataclass(kw_only=True)
class RangePlan:
    steps: list[int]
    layers: dict[str, LayerPlan] = field(default_factory=dict)
    alpha: float = 0.5
    act_shrink: float = 1.0
    scores: dict[str, dict[float, float]] = field(default_factory=dict)  # search -> candidate -> SQNR dB
    group_alpha: dict[str, float] = field(default_factory=dict)  # group tensor -> alpha (--alpha layer)
    smooth: dict[str, np.ndarray] = field(default_factory=dict)  # group tensor -> s
    folds: dict[str, int] = field(default_factory=dict)  # fold kind -> groups
    rotations: dict[str, np.ndarray] = field(default_factory=dict)  # group tensor -> R folded around it
    online: dict[str, np.ndarray] = field(default_factory=dict)  # group tensor -> R applied online
    # group tensor -> DuQuant's (R1, channel order, R2) whose product is online's R (emitted factored)
    online_factors: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]] = field(default_factory=dict)
    online_report: dict[str, dict[str, float]] = field(default_factory=dict)  # group tensor -> criterion, errors
    attention: dict[str, AttentionPlan] = field(default_factory=dict)  # attention module -> operand quantizers
    value_folds: set[str] = field(default_factory=set)  # value projections whose output a fold changes
    parts: dict[str, Any] = field(default_factory=dict)  # technique kind -> what it planned for the range
    weight_only: tuple[str, ...] = ()  # float-kept modules whose weights are stored int8 (passes.weight_only)


def _scaled(w: np.ndarray, by_rows: bool, s: np.ndarray) -> None:
    """w <- diag(s)·w (by rows) or w·diag(1/s) (by columns), in place."""
    if by_rows:
        w *= s[:, None]
    else:
        w /= s[None, :]


def _made_on(source: np.ndarray | torch.Tensor, scalings: Any, device: torch.device) -> torch.Tensor:
    """source.astype(float64) with _scaled applied for each (by rows?, s) in order, computed on
    `device` (float32 → float64 is exact, and one IEEE product or quotient per element is the
    same on any device: the values are numpy's, bit for bit)."""
    if isinstance(source, torch.Tensor):
        t = source
    else:
        with warnings.catch_warnings():  # a read-only array (the FP weight's view), only read
            warnings.simplefilter("ignore", UserWarning)
            t = torch.from_numpy(source)
    t = t.to(device).to(torch.float64).contiguous()
    for by_rows, s in scalings:
        v = torch.from_numpy(np.asarray(s, dtype=np.float64)).to(device)
        if by_rows:
            t.mul_(v[:, None])
        else:
            t.div_(v[None, :])
    return t


class FinalWeights(dict[str, np.ndarray]):
    """W^T per layer as the steps leave it, float64, made from the FP weight on first use and
    dropped once the layer is quantized (release), so a range holds float64 copies of the layers
    in flight only, not of the whole model. Smoothing's scalings of a layer not yet made wait
    (scale_rows, divide_columns) and are applied, in order, when it is made: by the thread that
    quantizes it, not by the one planning the groups."""

    def __init__(self, weights: Mapping[str, np.ndarray]) -> None:
        super().__init__()
        self.weights = FPWeights.of(weights)
        self.released: set[str] = set()
        self.waiting: dict[str, list[tuple[bool, np.ndarray]]] = {}  # layer -> (by rows?, vector) in order
        self.parked: dict[str, torch.Tensor] = {}  # made weights moved to a device (park)

    def __missing__(self, layer: str) -> np.ndarray:
        if layer in self.released:
            raise KeyError(f"{layer}: its final weight was released after quantization")
        if layer in self.parked:
            value = self.parked.pop(layer).cpu().numpy()
        else:
            value = self.weights[layer].astype(np.float64)
            for by_rows, vector in self.waiting.pop(layer, ()):
                _scaled(value, by_rows, vector)
        self[layer] = value
        return value

    def park(self, layer: str, device: str) -> torch.Tensor:
        """The weight as a float64 tensor on `device`, its host copy dropped; read again, it comes
        back from there: GPTQ's held-back weights wait on a GPU, not in host memory. A layer not yet
        made is made there: its FP weight sent as it is (float32), widened and scaled on the device
        by the same float64 products and quotients as on the host, so no float64 copy of it is ever
        made in host memory. No scaling may follow (a layer is parked once no later group changes it)."""
        if layer in self.parked:
            return self.parked[layer]
        if layer in self or layer in self.released:  # made on the host (a released one refuses)
            tensor = torch.from_numpy(self[layer]).to(device)
            del self[layer]
        else:  # from the device-held FP weight where a GPU build released the host's (passes.fp_weights)
            held = self.weights.device_weight(layer)
            source = held if held is not None else self.weights[layer]
            tensor = _made_on(source, self.waiting.pop(layer, ()), torch.device(device))
        self.parked[layer] = tensor
        return tensor

    def scale_rows(self, layer: str, s: np.ndarray) -> None:
        """W^T <- diag(s)·W^T (each input channel's row times its s)."""
        self._scale(layer, True, s)

    def divide_columns(self, layer: str, s: np.ndarray) -> None:
        """W^T <- W^T·diag(1/s) (each output channel divided by its s)."""
        self._scale(layer, False, s)

    def _scale(self, layer: str, by_rows: bool, s: np.ndarray) -> None:
        """In place on a made weight (a released one refuses, as reading it does), else waiting."""
        if layer in self.parked:
            raise ValueError(f"{layer}: its final weight is parked for GPTQ and can no longer change")
        if layer in self or layer in self.released:
            _scaled(self[layer], by_rows, s)
        else:
            self.waiting.setdefault(layer, []).append((by_rows, s))

    def release(self, layer: str) -> None:
        self.pop(layer, None)
        self.waiting.pop(layer, None)
        self.parked.pop(layer, None)
        self.released.add(layer)


@dataclass(kw_only=True)
class RangeStep:
    """What every group and layer step of one range shares (passes.plan builds it)."""

    plan: RangePlan
    config: QuantConfig
    target: TargetProfile
    weights: FPWeights  # FP W^T [in, out]
    final_w: FinalWeights  # W^T as the steps leave it (smoothed, rotated), float64
    final_b: dict[str, np.ndarray | None]  # biases as the steps leave them, float64
    changed_bias: set[str]  # layers whose bias the build writes
    w_grid: Grid
    a_grid: Grid
    samples: dict[str, np.ndarray] | None  # FP inputs of each group's first layer over the range
    head_dims: dict[str, int]
    grams: Mapping[str, Gram] | None  # X^T X of each group's first layer's FP input
    memo: Memo | None

    def add_bias(self, layer: str, delta: np.ndarray) -> None:
        """b <- b + delta on a layer that has a bias; the build then writes it."""
        bias = self.final_b[layer]
        assert bias is not None, layer
        self.final_b[layer] = bias + delta
        self.changed_bias.add(layer)


@dataclass(kw_only=True)
class GroupStep:
    """One input-sharing group as the technique steps refine it: its smoothing divisor, the
    per-tensor range of what its quantizer sees, that input's per-channel magnitude and samples,
    the subtraction and rotation applied before the quantizer, and the H its weights round against."""

    rng: RangeStep
    g: Group
    stats: LayerStats  # the group's first layer's
    act: np.ndarray  # per-channel activation magnitude a_j from the statistics
    s: np.ndarray | None = None  # smoothing vector
    lo: float = 0.0
    hi: float = 0.0
    unshrunk: tuple[Any, Any] | None = None  # (lo, hi) before the observer's shrink
    magnitude: np.ndarray | None = None  # per input channel |X/s| (weights the low-rank SVD)
    subtract: np.ndarray | None = None  # z subtracted from X/s before the quantizer
    rotation: np.ndarray | None = None  # R folded around the group (head rotation)
    online: np.ndarray | None = None  # R applied online before the quantizer
    hessian: Hessian | None = None  # H of the input it quantizes (GPTQ; on a GPU build's device)
    _values: np.ndarray | None = None

    @property
    def divisor(self) -> np.ndarray | float:
        return 1.0 if self.s is None else self.s

    @property
    def values(self) -> np.ndarray:
        """The replayed samples of what the quantizer sees (X / s - z, then rotated by the steps)."""
        if self._values is None:
            first, samples = self.g.layers[0], self.rng.samples
            if samples is None or first not in samples:
                raise QexportError(f"the activation observer or a rotation has no samples of {first}")
            x = samples[first] / self.divisor
            self._values = x if self.subtract is None else x - self.subtract
        return self._values

    @values.setter
    def values(self, x: np.ndarray) -> None:
        self._values = x

    def set_range(self, lo: float, hi: float) -> None:
        self.lo, self.hi = lo, hi


@dataclass(kw_only=True)
class LayerStep:
    """One linear after its weight is quantized: the layer plan the later steps complete."""

    rng: RangeStep
    layer: str
    made: Callable[[], np.ndarray]  # the final FP W^T that was quantized, float64 (FinalWeights)
    lp: LayerPlan
    hessian: Hessian | None
    magnitude: np.ndarray

    @property
    def w(self) -> np.ndarray:
        """The final FP W^T, made (or brought back from a GPU build's device) when a step first reads
        it and kept by FinalWeights after: most techniques never do, and a GPTQ-rounded linear's
        host copy is then never made."""
        return self.made()
