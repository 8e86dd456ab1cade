"""Hadamard rotations that fold offline (``build --rotate``), numpy only.

Attention is linear in V per head: O_h = P_h·V_h, so for any orthogonal R_h, (P_h·V_h·R_h) = O_h·R_h.
A block-diagonal R = diag(R_1, …, R_H) over the heads therefore folds exactly into the value
projection's output columns (W_v ← W_v·R, b_v ← b_v·R) and the attention-output linear's input
rows (W_out ← Rᵀ·W_out, with W as Wᵀ [in, out]): the FP function is unchanged while the
attention-output linear's input, O·R, has its outlier channels spread over each head.
"""

from __future__ import annotations

import numpy as np

from qexport.errors import QexportError


def _is_prime(q: int) -> bool:
    return q >= 2 and all(q % p for p in range(2, int(q**0.5) + 1))


def _paley(q: int) -> np.ndarray:
    """Paley construction I: a Hadamard matrix of order q + 1 for a prime q ≡ 3 (mod 4)."""
    residues = {(i * i) % q for i in range(1, q)}
    chi = np.array([0] + [1 if k in residues else -1 for k in range(1, q)])
    jacobsthal = chi[(np.arange(q)[None, :] - np.arange(q)[:, None]) % q]  # antisymmetric for q ≡ 3 (mod 4)
    s = np.zeros((q + 1, q + 1), dtype=np.int64)
    s[0, 1:], s[1:, 0], s[1:, 1:] = 1, -1, jacobsthal
    return np.eye(q + 1, dtype=np.int64) + s


def hadamard(n: int) -> np.ndarray:
    """An orthonormal Hadamard matrix (entries ±1/√n) of order n = 2^k·m, m = 1 or m = q + 1 for a
    prime q ≡ 3 (mod 4) (e.g. 48 = 4·12, 72 = 71 + 1, 64 = 2^6).

    Raises:
        QexportError: no such construction for n.
    """
    for k in range(n.bit_length()):
        if n % 2**k:
            break
        m = n // 2**k
        if m == 1 or (_is_prime(m - 1) and (m - 1) % 4 == 3):
            h = np.ones((1, 1), dtype=np.int64) if m == 1 else _paley(m - 1)
            for _ in range(k):
                h = np.block([[h, h], [h, -h]])
            return h.astype(np.float64) / np.sqrt(n)
    raise QexportError(f"no Hadamard construction for size {n} (need 2^k·m, m = 1 or a prime ≡ 3 mod 4 plus 1)")


def head_rotation(channels: int, head_dim: int) -> np.ndarray:
    """The block-diagonal rotation [channels, channels] with one Hadamard block per head.

    Raises:
        QexportError: channels not a multiple of head_dim, or no Hadamard of that order.
    """
    if head_dim <= 0 or channels % head_dim:
        raise QexportError(f"cannot rotate {channels} channels in heads of {head_dim}")
    return np.kron(np.eye(channels // head_dim), hadamard(head_dim))


def rotated_range(
    values: np.ndarray, rot: np.ndarray, lo: float, hi: float
) -> tuple[float, float, np.ndarray, np.ndarray]:
    """Range, per-channel magnitude and samples of X·R, from replayed samples X of the unrotated
    input: the samples' rotated extremes, widened by how much wider the statistics' range of X is
    than the samples' (the replay sees fewer prompts than the calibration)."""
    rotated = values @ rot
    widen = max(1.0, max(hi, -lo) / max(float(np.abs(values).max()), 1e-12))
    return widen * float(rotated.min()), widen * float(rotated.max()), np.abs(rotated).max(axis=0), rotated


DUQUANT_STEPS = 64  # greedy rotation steps per block rotation (the best prefix is kept)
DUQUANT_ROWS = 1024  # input rows the greedy steps look at (evenly spaced)


def _spreading(block: int, rng: np.random.Generator) -> np.ndarray:
    """DuQuant's base rotation R̃·Q: an orthonormal Hadamard (its first row uniform, so the first
    channel's value is spread evenly over the block) times diag(1, Q') with Q' a random orthogonal
    matrix (QR of a Gaussian one, signs fixed)."""
    q, r = np.linalg.qr(rng.standard_normal((block - 1, block - 1)))
    mix = np.eye(block)
    mix[1:, 1:] = q * np.sign(np.diag(r))
    return hadamard(block) @ mix


def _greedy_block_rotation(x: np.ndarray, base: np.ndarray, steps: int) -> np.ndarray:
    """The block rotation R [B, B] applied to every block of x [rows, C] (as x reshaped [-1, B]):
    step by step, the channel d holding the largest magnitude is moved to the first place of the
    base rotation (E_d·R̃Q·E_d, E_d swapping channels 0 and d), which spreads it over the block; of
    the products of the first k steps, the one with the smallest peak (max − min) is kept."""
    block = base.shape[0]
    y = x.reshape(-1, block)
    rotation, best, best_peak = np.eye(block), np.eye(block), float(y.max() - y.min())
    for _ in range(steps):
        d = int(np.unravel_index(np.argmax(np.abs(y)), y.shape)[1])
        swap = np.arange(block)
        swap[[0, d]] = swap[[d, 0]]
        step = base[np.ix_(swap, swap)]
        y, rotation = y @ step, rotation @ step
        peak = float(y.max() - y.min())
        if peak < best_peak:
            best, best_peak = rotation.copy(), peak
    return best


def _zigzag(magnitude: np.ndarray, block: int) -> np.ndarray:
    """DuQuant's zigzag permutation: channels by decreasing magnitude dealt to the blocks in the
    order 0, 1, …, n−1, n−1, …, 1, 0, 0, 1, …, so every block gets a like share of the outliers;
    returns the channel order (block after block)."""
    count = len(magnitude) // block
    blocks: list[list[int]] = [[] for _ in range(count)]
    for i, channel in enumerate(np.argsort(-magnitude, kind="stable")):
        turn, pos = divmod(i, count)
        blocks[pos if turn % 2 == 0 else count - 1 - pos].append(int(channel))
    return np.array([c for b in blocks for c in sorted(b, key=lambda c: -magnitude[c])])


def duquant_factors(
    values: np.ndarray, block: int, steps: int = DUQUANT_STEPS, seed: int = 0
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """DuQuant's dual transformation (Lin et al., NeurIPS 2024, Sec. 3.2) of an input X [rows, C]:
    a block rotation R1 [B, B] found greedily on X (the same rotation in every block), the zigzag
    channel order π [C] of the rotated input, and a second greedy block rotation R2 [B, B]:
    X ↦ ((X·diag(R1, …, R1))[:, π])·diag(R2, …, R2).

    Raises:
        QexportError: C not a multiple of B, or no Hadamard of order B.
    """
    channels = values.shape[1]
    if block < 2 or channels % block:
        raise QexportError(f"DuQuant rotation: {channels} channels do not split into blocks of {block}")
    rng = np.random.default_rng(seed)
    base = _spreading(block, rng)
    values = values[:: -(-len(values) // DUQUANT_ROWS)]
    eye = np.eye(channels // block)
    r1 = _greedy_block_rotation(values, base, steps)
    rotated = values @ np.kron(eye, r1)
    order = _zigzag(np.abs(rotated).max(axis=0), block)
    r2 = _greedy_block_rotation(rotated[:, order], base, steps)
    return r1, order, r2


def compose_duquant(r1: np.ndarray, order: np.ndarray, r2: np.ndarray) -> np.ndarray:
    """The orthogonal matrix M [C, C] with X·M = ((X·diag(R1, …))[:, π])·diag(R2, …)."""
    eye = np.eye(len(order) // len(r1))
    return np.kron(eye, r1)[:, order] @ np.kron(eye, r2)
