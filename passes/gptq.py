"""Error-compensating weight rounding (``build --weight-rounding gptq``; GPTQ, Frantar et al. 2022),
numpy in and out, the solve in torch float64 on the build's device (``build --device``).

W^T [in, out] is rounded one input channel (row) at a time onto the plan's per-output-channel grid
(the scales and zero points nearest rounding uses, unchanged); each row's rounding error is spread
over the rows not yet rounded through the inverse of H = XᵀX + λI, the Gram matrix of the input the
layer quantizes (X/s, smoothing applied), so that ‖X·W − X·Q(W)‖ stays small. Only the integers
change. H comes from the build (replayed calibration inputs); this module sees arrays only.
"""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Mapping
from enum import StrEnum
from functools import cache

import numpy as np
import torch
from qexport.passes.quant import STORAGE, Grid, dequantize, qparams, rows

DAMP = 0.01  # λ = DAMP · mean diagonal of H
HOLD_BYTES = 4 << 30  # see Memo.hold
BLOCK = 128  # rows rounded between two lazy updates of the rest (same result, fewer passes over W)
ACT_ORDER = True  # round the rows in order of decreasing H diagonal (measured: docs/lab/w8a8-study.md)
CLIP_RATIOS = (1.0, 0.95, 0.9, 0.85, 0.8, 0.75)  # of the min-max range, tried by --weight-clip mse


class Rounding(StrEnum):
    NEAREST = "nearest"
    GPTQ = "gptq"


Rounded = tuple[np.ndarray, np.ndarray, np.ndarray]  # per-channel scale, zero point, integers


class Memo:
    """The last GPTQ result of each layer with a digest of everything it depends on (the planned
    weight, H, the grid, the clip rule). A build with weights shared between ranges (ASQ, no
    smoothing) plans the same weight and H for every step, and a plan made again (the chosen one,
    or a mixed-precision allocation's unchanged layers) repeats them: those plans get the integers
    back instead of repeating the rounding. One result per layer is kept (about one model's
    integers). It also says where the solves run and how much a plan holds back to batch them."""

    def __init__(self, device: str = "cpu", hold: int | None = None) -> None:
        self._last: dict[str, tuple[bytes, Rounded]] = {}
        self._lock = threading.Lock()  # plans look results up from several threads
        self.hits = 0
        self.device = device  # where the solves of the plans that use this memo run
        # float64 weights and Hessians a plan may hold back to solve more linears of one shape together:
        # on a GPU, HOLD_BYTES; on the CPU none beyond a group's own (no faster there: docs/benchmarks.md)
        self.hold = hold if hold is not None else (0 if torch.device(device).type == "cpu" else HOLD_BYTES)
        # whether a weight waiting for its solve moves to the device (FinalWeights.park): on a GPU
        self.park = torch.device(device).type != "cpu"

    def get(self, layer: str, key: bytes) -> Rounded | None:
        with self._lock:
            last = self._last.get(layer)
            if last is None or last[0] != key:
                return None
            self.hits += 1
            return last[1]

    def put(self, layer: str, key: bytes, value: Rounded) -> None:
        with self._lock:
            self._last[layer] = (key, value)

    def follow(self, moved: Mapping[str, tuple[np.ndarray, np.ndarray]]) -> None:
        """Where a layer's kept integers are `old` of moved[layer] = (old, new), keep `new` instead
        (equal values: a written plan's integers as read-only views of the weights file, so the
        memo holds no second copy of a written model's integers)."""
        with self._lock:
            for layer, (old, new) in moved.items():
                last = self._last.get(layer)
                if last is not None and last[1][2] is old:
                    self._last[layer] = (last[0], (last[1][0], last[1][1], new))


_WORDS = 1 << 18  # 8-byte words per chunk of an array's bytes (2 MiB)


@cache
def _multipliers() -> np.ndarray:
    """[2, _WORDS] odd uint64 from a fixed seed, made on first use."""
    half = np.random.default_rng(0x5EED).integers(0, 2**63, (2, _WORDS), dtype=np.uint64)
    return half * np.uint64(2) + np.uint64(1)


def _folded(a: np.ndarray | torch.Tensor) -> bytes:
    """An array's bytes folded to 16 bytes per 2 MiB chunk: the chunk as 8-byte words c, the sums
    c·m1 and c·m2 modulo 2^64 over two fixed odd multipliers (numpy's unsigned dot, about 7 times
    blake2b's speed on a weight); a tail under 8 bytes as it is. Chunks that differ in one word
    always fold apart (an odd multiplier is invertible modulo 2^64); two that differ otherwise fold
    alike only where both sums' differences vanish, which no natural pair of weights meets. A
    device's tensor is folded there (_folded_tensor): the same bytes, no host copy of it."""
    if isinstance(a, torch.Tensor) and a.device.type != "cpu":
        return _folded_tensor(a)
    m, parts, tail = _multipliers(), [], b""
    raw = (a.detach().contiguous().reshape(-1).view(torch.uint8).numpy() if isinstance(a, torch.Tensor)
           else a.reshape(-1).view(np.uint8))  # fmt: skip
    step = 8 * _WORDS
    for start in range(0, raw.size, step):
        chunk = raw[start : start + step]
        n = chunk.size - chunk.size % 8  # only the last chunk may end in a tail
        words = chunk[:n].view(np.uint64)
        if words.size:
            parts.append(np.array([np.dot(words, m[0, : words.size]), np.dot(words, m[1, : words.size])]).tobytes())
        tail = chunk[n:].tobytes()
    return b"".join(parts) + tail


FOLD_CHUNKS = 16  # chunks (2 MiB each) a device tensor's fold multiplies at once: 32 MiB int64 products


@cache
def _device_multipliers(device: torch.device) -> torch.Tensor:
    """_multipliers as int64 on a device, sent there once."""
    return torch.from_numpy(_multipliers().view(np.int64)).to(device)


def _folded_tensor(t: torch.Tensor) -> bytes:
    """_folded of a tensor's bytes, computed on its device (a GPU build's parked weights and H are
    keyed without reading them back): the words as int64, whose products and sums wrap modulo 2^64
    exactly as uint64 ones do, so the 16 bytes per chunk are numpy's; only they and the tail come back."""
    if not t.numel():
        return b""
    flat = t.detach().contiguous().reshape(-1).view(torch.uint8)
    whole = flat.numel() // 8
    words = flat[: whole * 8].view(torch.int64)
    m = _device_multipliers(t.device)
    sums = []
    for start in range(0, whole, FOLD_CHUNKS * _WORDS):
        part = words[start : start + FOLD_CHUNKS * _WORDS]
        if part.numel() % _WORDS:  # the last chunk, padded with zero words (which add nothing)
            part = torch.nn.functional.pad(part, (0, _WORDS - part.numel() % _WORDS))
        rows = part.view(-1, _WORDS)
        sums.append(torch.stack([(rows * m[0]).sum(dim=1), (rows * m[1]).sum(dim=1)], dim=1))
    folded = torch.cat(sums).cpu().numpy().view(np.uint64) if sums else np.zeros((0, 2), np.uint64)
    return folded.tobytes() + flat[whole * 8 :].cpu().numpy().tobytes()


def digest(*parts: np.ndarray | torch.Tensor | str) -> bytes:
    """A content key of arrays (dtype, shape and bytes, the bytes folded by ``_folded``), tensors
    (a GPU build's H, folded without a host copy of the whole) and strings: the memo's and the
    fold's, which hash gigabytes of weights per range at full size."""
    h = hashlib.blake2b(digest_size=20)
    for part in parts:
        if isinstance(part, str):
            h.update(part.encode())
        elif isinstance(part, torch.Tensor):
            h.update(f"{part.dtype}{tuple(part.shape)}".encode())
            h.update(_folded(part))
        else:
            a = np.ascontiguousarray(part)
            h.update(f"{a.dtype}{a.shape}".encode())
            h.update(_folded(a))
    return h.digest()


Gram = np.ndarray | torch.Tensor  # XᵀX [in, in], float64: a build keeps it on its device (torch)
Hessian = np.ndarray | torch.Tensor  # H [in, in], float64: on a GPU build's device unless rotated


def input_hessian(gram: Gram, divisor: np.ndarray | float, rotation: np.ndarray | None = None) -> Hessian:
    """H of the input a layer quantizes, (X/s)·R, from the Gram matrix XᵀX of its FP input X.

    Args:
        gram: XᵀX [in, in] of the FP input; a tensor on a GPU is divided there (the same float64
            products and quotients as numpy's) and H stays there unless rotated, so a GPU build's
            host memory holds neither the range's Gram matrices nor the H of the linears GPTQ holds
            back; a tensor on the host goes through numpy.
        divisor: s per input channel (or 1.0 without smoothing).
        rotation: R folded after the division (``--rotate``, on the host), or None.
    """
    d = np.broadcast_to(np.asarray(divisor, dtype=np.float64), (gram.shape[0],))
    if isinstance(gram, torch.Tensor) and gram.device.type == "cpu":
        gram = gram.numpy()  # a view: numpy divides faster than torch on the host
    if isinstance(gram, torch.Tensor):
        divided = _divided(gram, d)
        if rotation is None:
            return divided  # stays on the device
        h = on_host(divided)
    else:
        h = np.asarray(gram, dtype=np.float64) / np.outer(d, d)
    return h if rotation is None else rotation.T.astype(np.float64) @ h @ rotation.astype(np.float64)


def _divided(gram: torch.Tensor, d: np.ndarray) -> torch.Tensor:
    """gram / (d dᵀ) where the tensor lives: numpy's float64 products and quotients."""
    dt = torch.tensor(d, dtype=torch.float64, device=gram.device)
    return gram.to(torch.float64) / torch.outer(dt, dt)


def on_host(h: Hessian) -> np.ndarray:
    """H as a float64 array on the host (a device tensor copied, an array as it is)."""
    return h.cpu().numpy() if isinstance(h, torch.Tensor) else h


def _diagonal(h: Hessian) -> np.ndarray:
    """H's diagonal on the host (only it copied from a device)."""
    return torch.diagonal(h).cpu().numpy() if isinstance(h, torch.Tensor) else np.diag(h)


def damped(h: np.ndarray, damp: float = DAMP) -> np.ndarray:
    """H + λI with λ = damp · mean diagonal (1 where H is zero): positive definite."""
    mean = float(np.mean(np.diag(h)))
    return np.asarray(h, dtype=np.float64) + np.eye(len(h)) * (damp * mean if mean > 0 else 1.0)


def _inverse_factor(h: torch.Tensor) -> torch.Tensor:
    """Upper-triangular U with H⁻¹ = UᵀU, for each (damped) H of a batch [B, n, n]."""
    return torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)


def gptq_quantize(
    w: np.ndarray,
    h: Hessian,
    scale: np.ndarray,
    zero: np.ndarray,
    grid: Grid,
    act_order: bool = ACT_ORDER,
    damp: float = DAMP,
    device: str = "cpu",
) -> np.ndarray:
    """The integers of W^T [in, out] on the given grid, rounded with error compensation.

    Args:
        w: the FP weight W^T [in, out] as planned (smoothing folded in).
        h: [in, in] Gram matrix of the input the layer quantizes (``input_hessian``).
        scale, zero: [out] per-output-channel quantization parameters, or [in / g, out] per group of g
            input channels (group_weights; fixed before rounding, "static groups"), kept as they are.
        grid: the weight grid (bits, storage, symmetry).
        act_order: round rows in order of decreasing H diagonal.
        damp: λ as a fraction of H's mean diagonal.
        device: where torch solves (float64 everywhere; each row rounded as ``quant.quantize`` does).

    Returns:
        [in, out] integers in the storage dtype, inside [grid.qmin, grid.qmax].
    """
    return gptq_quantize_many([(w, h, scale, zero)], grid, act_order, damp, device)[0]


Problem = tuple[np.ndarray | torch.Tensor, Hessian, np.ndarray, np.ndarray]  # W^T, H, scale, zero point


def gptq_quantize_many(
    problems: list[Problem],
    grid: Grid,
    act_order: bool = ACT_ORDER,
    damp: float = DAMP,
    device: str = "cpu",
) -> list[np.ndarray]:
    """``gptq_quantize`` of layers of one shape and grid, solved together: one row loop over a batch
    of them (on a GPU, one kernel per operation for the whole batch instead of one per layer)."""
    dev = torch.device(device)
    n, m = problems[0][0].shape
    diagonals = [_diagonal(h) for _, h, _, _ in problems]
    orders = [np.argsort(-d, kind="stable") if act_order else np.arange(n) for d in diagonals]

    def stacked(arrays: list[np.ndarray] | list[Hessian], dtype: type) -> torch.Tensor:
        """The arrays as one tensor on the device, each sent as it is (a tensor already there
        stays) and stacked there: no stacked host copy of a batch's weights and Hessians."""
        as_torch = torch.float64 if dtype is np.float64 else torch.float32

        def sent(a: np.ndarray | torch.Tensor) -> torch.Tensor:
            return (
                a.to(dev, as_torch)
                if isinstance(a, torch.Tensor)
                else torch.from_numpy(np.ascontiguousarray(a, dtype=dtype)).to(dev)
            )

        return torch.stack([sent(a) for a in arrays])

    pairs = list(zip(problems, orders, strict=True))
    # H and W^T sent as they are and put in row order on the device; λ from the ordered diagonal as
    # damped() takes it (the same float64 values as damped(h[np.ix_(o, o)]))
    index = torch.from_numpy(np.stack(orders)).to(dev)
    h = stacked([h for _, h, _, _ in problems], np.float64)
    h = h.gather(1, index[:, :, None].expand(-1, -1, n)).gather(2, index[:, None, :].expand(-1, n, -1))
    lam = [damp * mean if (mean := float(np.mean(d[o]))) > 0 else 1.0 for d, o in zip(diagonals, orders, strict=True)]
    h.diagonal(dim1=-2, dim2=-1).add_(torch.tensor(lam, dtype=torch.float64, device=dev)[:, None])
    u = _inverse_factor(h)
    del h
    rest = stacked([w for w, _, _, _ in problems], np.float64)
    rest = rest.gather(1, index[:, :, None].expand(-1, -1, m))
    # per output channel [batch, m]; per group of input channels each row's own [batch, n, m], in row order
    grouped = np.ndim(problems[0][2]) == 2
    s32 = stacked([rows(p[2], n)[o] if grouped else p[2] for p, o in pairs], np.float32)
    z32 = stacked([rows(p[3], n)[o] if grouped else p[3] for p, o in pairs], np.float32)
    q = torch.empty(rest.shape, dtype=torch.float32, device=dev)
    rounder = _graphed_rounder if dev.type == "cuda" else _round_block
    rounder(rest, u, q, s32, z32, grouped, grid)
    ints = q.cpu().numpy().astype(STORAGE[grid.storage][0])
    out = []
    for k, o in enumerate(orders):
        unordered = np.empty((n, m), dtype=ints.dtype)
        unordered[o] = ints[k]
        out.append(unordered)
    return out


def _round_rows(
    block: torch.Tensor, u: torch.Tensor, q: torch.Tensor, errs: torch.Tensor,
    s: torch.Tensor, z: torch.Tensor, grouped: bool, grid: Grid,
) -> None:  # fmt: skip
    """One block's rows rounded in order, each row's error spread over the block's later rows.
    block [B, L, m] float64 (updated in place), u [B, L, L] its part of the inverse factor, q and
    errs [B, L, m] written (float32 integers, float64 errors), s / z [B, m] or [B, L, m] grouped."""
    diag = torch.diagonal(u, dim1=-2, dim2=-1)
    for i in range(block.shape[1]):
        si, zi = (s[:, i], z[:, i]) if grouped else (s, z)
        # quant.quantize written into q, the error into errs: the same operations, two copies fewer a row
        qi = torch.div(block[:, i].float(), si, out=q[:, i]).round_().add_(zi).clamp_(grid.qmin, grid.qmax)
        err = torch.sub(block[:, i], ((qi - zi) * si).double(), out=errs[:, i]).div_(diag[:, i, None])
        block[:, i + 1 :] -= u[:, i, i + 1 :, None] * err[:, None, :]


def _round_block(
    rest: torch.Tensor, u: torch.Tensor, q: torch.Tensor,
    s32: torch.Tensor, z32: torch.Tensor, grouped: bool, grid: Grid,
) -> None:  # fmt: skip
    """GPTQ's blocked row loop over W^T in row order (rest, [B, n, m] float64, consumed), the
    integers into q: BLOCK rows at a time, then one lazy update of the rows after them."""
    n = rest.shape[1]
    for b0 in range(0, n, BLOCK):
        b1 = min(b0 + BLOCK, n)
        errs = torch.empty(rest[:, b0:b1].shape, dtype=torch.float64, device=rest.device)
        s, z = (s32[:, b0:b1], z32[:, b0:b1]) if grouped else (s32, z32)
        _round_rows(rest[:, b0:b1], u[:, b0:b1, b0:b1], q[:, b0:b1], errs, s, z, grouped, grid)
        rest[:, b1:] -= u[:, b0:b1, b1:].transpose(-1, -2) @ errs


def _graphed_rounder(
    rest: torch.Tensor, u: torch.Tensor, q: torch.Tensor,
    s32: torch.Tensor, z32: torch.Tensor, grouped: bool, grid: Grid,
) -> None:  # fmt: skip
    """``_round_block`` on a GPU, its row loop replayed as one CUDA graph per block: the same
    kernels on the same values, launched once a block instead of about ten times a row (the row
    loop is launch-bound: docs/benchmarks.md). The rows are copied into static buffers; the first
    full block runs eagerly on them (the warm-up capture needs) and is captured after, a block
    shorter than BLOCK at the end runs eagerly. The integers are the eager loop's, bit for bit
    (tests/test_gptq.py's GPU check; bench/gptq_rows.py times the two)."""
    n = rest.shape[1]
    full = n // BLOCK
    if full < 2:  # a capture would not pay for itself
        _round_block(rest, u, q, s32, z32, grouped, grid)
        return
    block = torch.empty_like(rest[:, :BLOCK])
    ub = torch.empty_like(u[:, :BLOCK, :BLOCK])
    qb = torch.empty_like(q[:, :BLOCK])
    errs = torch.empty_like(block)
    sb, zb = (torch.empty_like(s32[:, :BLOCK]), torch.empty_like(z32[:, :BLOCK])) if grouped else (s32, z32)
    graph: torch.cuda.CUDAGraph | None = None
    for k in range(full):
        b0, b1 = k * BLOCK, (k + 1) * BLOCK
        block.copy_(rest[:, b0:b1])
        ub.copy_(u[:, b0:b1, b0:b1])
        if grouped:
            sb.copy_(s32[:, b0:b1])
            zb.copy_(z32[:, b0:b1])
        if graph is None:  # the first block: eagerly, on a side stream as capture asks, then captured
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                _round_rows(block, ub, qb, errs, sb, zb, grouped, grid)
            torch.cuda.current_stream().wait_stream(side)
            q[:, b0:b1].copy_(qb)
            rest[:, b1:] -= u[:, b0:b1, b1:].transpose(-1, -2) @ errs
            graph = torch.cuda.CUDAGraph()
            # records the kernels without running them; other threads of the build may use the GPU meanwhile
            with torch.cuda.graph(graph, capture_error_mode="thread_local"):
                _round_rows(block, ub, qb, errs, sb, zb, grouped, grid)
            continue
        graph.replay()
        q[:, b0:b1].copy_(qb)
        rest[:, b1:] -= u[:, b0:b1, b1:].transpose(-1, -2) @ errs
    if full * BLOCK < n:
        tail = slice(full * BLOCK, n)
        s, z = (s32[:, tail], z32[:, tail]) if grouped else (s32, z32)
        errs_t = torch.empty_like(rest[:, tail])
        _round_rows(rest[:, tail], u[:, tail, tail], q[:, tail], errs_t, s, z, grouped, grid)


def output_clipped_qparams(
    w: np.ndarray, h: Hessian, grid: Grid, pow2: bool = False, per_channel: bool = True, device: str = "cpu"
) -> tuple[np.ndarray, np.ndarray]:
    """Scale and zero point [out] whose GPTQ rounding leaves the least layer-output error eᵀHe: per
    output channel, the clip ratio of its min-max range from CLIP_RATIOS (one ratio for the whole
    matrix where the target has one scale per tensor). GPTQ keeps the output channels apart, so each
    channel's error depends on its own ratio only.
    """
    n_out, h_host = w.shape[1], on_host(h)
    lo, hi = (w.min(axis=0), w.max(axis=0)) if per_channel else (np.full(n_out, w.min()), np.full(n_out, w.max()))
    best_err = np.full(n_out, np.inf)
    best_scale, best_zero = qparams(lo, hi, grid, pow2)
    for r in CLIP_RATIOS:
        scale, zero = qparams(r * lo, r * hi, grid, pow2)
        e = np.asarray(w, dtype=np.float64) - dequantize(
            gptq_quantize(w, h, scale, zero, grid, device=device), scale, zero
        )
        err = ((h_host @ e) * e).sum(axis=0)
        err = err if per_channel else np.full(n_out, err.sum())
        better = err < best_err
        best_err = np.where(better, err, best_err)
        best_scale = np.where(better, scale, best_scale)
        best_zero = np.where(better, zero, best_zero)
    return best_scale.astype(np.float32), best_zero.astype(zero.dtype)
