"""What the CPU's int8 kernels compute. onnxruntime's x86 kernels for uint8 activations times int8
weights sum each pair of neighbouring products with PMADDUBSW, in saturating 16-bit arithmetic
(255 x 127 x 2 = 64,770 is clamped to 32,767); only VNNI (or AMX) sums them in 32 bits. On an x86
CPU without either, a session is asked for onnxruntime's exact mode instead
(``session.x64quantprecision``: the int8 weights re-encoded as uint8 at load, the same integers
times the same scales, through its slower uint8 x uint8 kernels)."""

from __future__ import annotations

import functools
import platform
from pathlib import Path

import onnxruntime as ort

EXACT_INT8 = "session.x64quantprecision"  # onnxruntime's kOrtSessionOptionsAvx2PrecisionMode
SUMS_IN_32_BITS = {"avx512_vnni", "avx512vnni", "avx_vnni", "avxvnni", "amx_int8"}  # /proc/cpuinfo flag names


@functools.cache
def saturates_int8(cpuinfo: Path = Path("/proc/cpuinfo")) -> bool:
    """Whether onnxruntime's uint8 x int8 kernels clamp pair sums on this CPU: an x86-64 CPU whose
    flags name no VNNI or AMX. (Other architectures' kernels sum in 32 bits; an x86 CPU whose flags
    cannot be read counts as clamping, the safe side.)"""
    if platform.machine().lower() not in ("x86_64", "amd64", "i686", "x86"):
        return False
    try:
        text = cpuinfo.read_text(errors="replace")
    except OSError:
        return True
    flags = next((line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags")), [])
    return not SUMS_IN_32_BITS & set(flags)


def exact_int8(options: ort.SessionOptions) -> ort.SessionOptions:
    """options asking for onnxruntime's exact int8 products where this CPU's would clamp; returns options."""
    if saturates_int8():
        options.add_session_config_entry(EXACT_INT8, "1")
    return options
