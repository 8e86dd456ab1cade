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
