"""Uniform quantizer math shared by the passes and the simulation (numpy only).

Asymmetric: scale = (max - min) / (qmax - qmin), zero point = qmin - round(min / scale), with
min <= 0 <= max. Symmetric: scale = max|x| / qmax, zero point 0. A restricted bit width (W6, A6,
W3) keeps its 2^b levels inside the storage type (int8 / int4 / int16 / uint8 / uint16).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

STORAGE = {  # ONNX storage type -> (numpy dtype, lowest, highest)
    "int4": (np.int8, -8, 7),
    "uint4": (np.uint8, 0, 15),
    "int8": (np.int8, -128, 127),
    "uint8": (np.uint8, 0, 255),
    "int16": (np.int16, -32768, 32767),
    "uint16": (np.uint16, 0, 65535),
}
EPS = 1e-12


@dataclass(frozen=True, kw_only=True)
class Grid:
    """The integer levels one quantizer uses: bits inside a storage type, symmetric or not.

    narrow: a symmetric signed grid drops its lowest code (int8 [-127, 127]); weights use it, while
    activations at the storage's full width keep [-128, 127], where QuantizeLinear saturates.
    """

    bits: int
    storage: str
    symmetric: bool
    narrow: bool = True

    @property
    def qmin(self) -> int:
        lo = STORAGE[self.storage][1]
        if lo == 0:
            return 0
        return -(2 ** (self.bits - 1)) + (1 if self.symmetric and self.narrow else 0)

    @property
    def qmax(self) -> int:
        if STORAGE[self.storage][1] == 0:
            return 2**self.bits - 1
        return 2 ** (self.bits - 1) - 1


def qparams(lo: np.ndarray, hi: np.ndarray, grid: Grid, pow2: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Scale and zero point (storage dtype) for ranges [lo, hi] (any matching shapes).

    pow2 rounds each scale up to a power of two (targets that need shift-only requantization).
    """
    lo = np.minimum(np.asarray(lo, dtype=np.float64), 0.0)
    hi = np.maximum(np.asarray(hi, dtype=np.float64), 0.0)
    dtype = STORAGE[grid.storage][0]
    if grid.symmetric:
        bound = np.maximum(np.maximum(-lo, hi), EPS)
        mid = 0 if STORAGE[grid.storage][1] < 0 else (grid.qmax + grid.qmin + 1) // 2  # uint: zero at the middle
        scale = bound / (grid.qmax - mid)
        if pow2:
            scale = 2.0 ** np.ceil(np.log2(scale))
        zero = np.full_like(scale, mid)
    else:
        scale = np.maximum(hi - lo, EPS) / (grid.qmax - grid.qmin)
        if pow2:
            scale = 2.0 ** np.ceil(np.log2(scale))
        zero = np.clip(grid.qmin - np.round(lo / scale), grid.qmin, grid.qmax)
    return scale.astype(np.float32), zero.astype(dtype)


def quantize(x: np.ndarray, scale: np.ndarray, zero: np.ndarray, grid: Grid) -> np.ndarray:
    """ONNX QuantizeLinear semantics: saturate(round_half_even(x / scale) + zero), restricted to the grid."""
    # in one buffer (a model's weights are large): x as float32, then in the type x / scale has
    q = np.array(x, dtype=np.float32)
    q = q.astype(np.result_type(q, scale), copy=False)
    np.divide(q, scale, out=q)
    np.rint(q, out=q)
    q += np.asarray(zero).astype(np.float32)
    np.clip(q, grid.qmin, grid.qmax, out=q)
    return q.astype(STORAGE[grid.storage][0])


def dequantize(q: np.ndarray, scale: np.ndarray, zero: np.ndarray) -> np.ndarray:
    """(q - zero) * scale in float32 (the product in the wider type where scale is wider)."""
    out = q.astype(np.float32)
    out -= np.asarray(zero).astype(np.float32)
    np.multiply(out, scale, out=out, casting="same_kind")
    return out


def rows(scale: np.ndarray, n: int) -> np.ndarray:
    """A weight's scale (or zero point) as it broadcasts over W^T [n, out]: per output channel [out]
    -> [1, out]; per input-channel group [n / g, out] -> each group's row repeated g times [n, out]."""
    if scale.ndim == 2:
        return np.repeat(scale, n // scale.shape[0], axis=0)
    return scale[None, :]


def decode_codebook(codebook: np.ndarray, codes: np.ndarray) -> np.ndarray:
    """W^T [in, out] from a codebook [k, d] and indices [in / d, out]: each index stands for d
    consecutive input channels of one output column (passes.techniques.codebook)."""
    blocks = codebook[codes.astype(np.int64)]  # [in / d, out, d]
    return np.ascontiguousarray(blocks.transpose(0, 2, 1).reshape(codes.shape[0] * codebook.shape[1], codes.shape[1]))


def group_qparams(w: np.ndarray, grid: Grid, size: int, pow2: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Scale and zero point [n / size, out] of W^T [n, out] per group of `size` input channels and
    output channel (min-max of each group)."""
    n, m = w.shape
    blocks = w.reshape(n // size, size, m)
    return qparams(blocks.min(axis=1), blocks.max(axis=1), grid, pow2)


CLIP_RATIOS = tuple(np.round(np.arange(1.0, 0.49, -0.05), 2))


def mse_clipped_qparams(w: np.ndarray, grid: Grid, pow2: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Per output channel (columns of W^T [in, out]): the clip ratio r of the min-max range that
    minimises the channel's squared quantization error, searched over CLIP_RATIOS."""
    lo, hi = w.min(axis=0), w.max(axis=0)
    best_err = np.full(w.shape[1], np.inf)
    best_scale, best_zero = qparams(lo, hi, grid, pow2)
    for r in CLIP_RATIOS:
        scale, zero = qparams(r * lo, r * hi, grid, pow2)
        err = ((dequantize(quantize(w, scale[None], zero[None], grid), scale[None], zero[None]) - w) ** 2).sum(axis=0)
        better = err < best_err
        best_err = np.where(better, err, best_err)
        best_scale = np.where(better, scale, best_scale)
        best_zero = np.where(better, zero, best_zero)
    return best_scale.astype(np.float32), best_zero.astype(zero.dtype)


def relative_error(x: np.ndarray, xq: np.ndarray, pairs: list[tuple[np.ndarray, np.ndarray]]) -> float:
    """Σ‖xq·wq − x·w‖² / Σ‖x·w‖² over a group's (FP weight, dequantized weight) pairs: the relative
    output error of linears that read one input, x in FP and xq as quantized."""
    err = ref = 0.0
    for w, wq in pairs:
        y = x @ w
        err += float(np.square(xq @ wq - y).sum())
        ref += float(np.square(y).sum())
    return err / max(ref, 1e-30)
