"""Fidelity metrics on numpy arrays: SQNR, PSNR, SSIM, cosine similarity, the temporal relation
divergence of a video against FP's."""

from __future__ import annotations

import numpy as np


def sqnr_db(reference: np.ndarray, test: np.ndarray) -> float:
    """10 log10(|ref|^2 / |test - ref|^2); inf when equal."""
    ref = np.asarray(reference, dtype=np.float64)
    noise = float(((np.asarray(test, dtype=np.float64) - ref) ** 2).sum())
    return float("inf") if noise == 0 else float(10 * np.log10(float((ref**2).sum()) / noise))


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    x, y = np.asarray(a, np.float64).ravel(), np.asarray(b, np.float64).ravel()
    norm = float(np.linalg.norm(x) * np.linalg.norm(y))
    return float(x @ y) / max(norm, 1e-30)


def psnr_db(reference: np.ndarray, test: np.ndarray, peak: float = 255.0) -> float:
    mse = float(((np.asarray(reference, np.float64) - np.asarray(test, np.float64)) ** 2).mean())
    return float("inf") if mse == 0 else float(10 * np.log10(peak * peak / mse))


def standard_error(values: list[float] | np.ndarray) -> float | None:
    """The standard error of the mean of values (sample sd / sqrt(n)); None below two values."""
    n = len(values)
    return float(np.std(values, ddof=1) / np.sqrt(n)) if n > 1 else None


def _box(x: np.ndarray, k: int) -> np.ndarray:
    """Mean over k x k windows of the last two spatial axes (valid region), via cumulative sums."""
    c = np.cumsum(np.cumsum(np.pad(x, [(0, 0)] * (x.ndim - 2) + [(1, 0), (1, 0)]), axis=-2), axis=-1)
    return (c[..., k:, k:] - c[..., :-k, k:] - c[..., k:, :-k] + c[..., :-k, :-k]) / (k * k)


def ssim(reference: np.ndarray, test: np.ndarray, peak: float = 255.0, window: int = 7) -> float:
    """Mean SSIM over uint8-range images [..., H, W, C] (7x7 uniform windows, per channel)."""
    a = np.moveaxis(np.asarray(reference, np.float64), -1, -3)
    b = np.moveaxis(np.asarray(test, np.float64), -1, -3)
    c1, c2 = (0.01 * peak) ** 2, (0.03 * peak) ** 2
    ma, mb = _box(a, window), _box(b, window)
    va, vb = _box(a * a, window) - ma * ma, _box(b * b, window) - mb * mb
    cov = _box(a * b, window) - ma * mb
    s = ((2 * ma * mb + c1) * (2 * cov + c2)) / ((ma * ma + mb * mb + c1) * (va + vb + c2))
    return float(s.mean())


def frame_relations(clip: np.ndarray) -> np.ndarray:
    """D [F, F]: each frame's relation distribution over the video's frames (Q-VDiT, Eqs. 13-14):
    T_ij = ρ(frame_i, frame_j), D_i = softmax_j(T_ij). The paper leaves ρ, "the similarity between two
    sequences", unnamed; here it is the cosine of the two frames centred on the video's mean frame (so
    the static background does not make every pair alike)."""
    frames = np.asarray(clip, dtype=np.float64).reshape(len(clip), -1)
    frames = frames - frames.mean(axis=0, keepdims=True)
    unit = frames / np.maximum(np.linalg.norm(frames, axis=1, keepdims=True), 1e-12)
    t = unit @ unit.T
    e = np.exp(t - t.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def temporal_kl(reference: np.ndarray, test: np.ndarray) -> float:
    """Q-VDiT's temporal maintenance objective as a metric (Eq. 15): Σ_i KL(D_i^FP ‖ D_i^Q) over the
    frames of a clip [F, ...] (0 when the quantized video keeps FP's frame-to-frame relations)."""
    p, q = frame_relations(reference), frame_relations(test)
    return float((p * (np.log(p) - np.log(q))).sum())
