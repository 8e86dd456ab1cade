"""This CPU's int8 peak: from /proc/cpuinfo (cores x clock x int8 ops per cycle of the widest
int8 unit it reports) and measured with one big onnxruntime MatMulInteger (uint8 x int8), beside
an fp32 MatMul of the same shape."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

# int8 multiply-accumulates per cycle per core, x2 ops each. AMX: one TMUL tile op = 16x16x64 int8
# MACs in 16 cycles -> 1024 MAC/cycle. AVX-512 VNNI: vpdpbusd = 64 MACs per instruction, 2 ports.
# AVX-VNNI / AVX2: 32 MACs per instruction (256-bit), 2 ports.
OPS_PER_CYCLE = {"amx_int8": 2048, "avx512_vnni": 256, "avx_vnni": 128, "avx2": 64}


@dataclass(frozen=True, kw_only=True)
class CpuPeak:
    model: str
    cores: int
    ghz: float
    unit: str
    peak_gops: float  # theoretical int8, all cores


def cpu_peak() -> CpuPeak:
    """Theoretical int8 peak from /proc/cpuinfo: the widest int8 unit the flags report."""
    text = Path("/proc/cpuinfo").read_text()
    first = text.split("\n\n")[0]
    field = {k.strip(): v.strip() for k, _, v in (line.partition(":") for line in first.splitlines())}
    flags = set(field.get("flags", "").split())
    unit = next((u for u in OPS_PER_CYCLE if u in flags), "scalar")
    cores = len(os.sched_getaffinity(0))
    ghz = float(field.get("cpu MHz", "0")) / 1e3
    return CpuPeak(model=field.get("model name", "?"), cores=cores, ghz=ghz, unit=unit,
                   peak_gops=cores * ghz * OPS_PER_CYCLE.get(unit, 2))  # fmt: skip


def _gemm_session(m: int, k: int, n: int, integer: bool, threads: int) -> tuple[ort.InferenceSession, dict]:
    rng = np.random.default_rng(0)
    if integer:
        a = helper.make_tensor_value_info("A", TensorProto.UINT8, [m, k])
        b = numpy_helper.from_array(rng.integers(-127, 128, (k, n)).astype(np.int8), "B")
        zero = numpy_helper.from_array(np.array(128, np.uint8), "a_zero")
        node = helper.make_node("MatMulInteger", ["A", "B", "a_zero"], ["Y"])
        y = helper.make_tensor_value_info("Y", TensorProto.INT32, [m, n])
        inits = [b, zero]
        feeds = {"A": rng.integers(0, 256, (m, k)).astype(np.uint8)}
    else:
        a = helper.make_tensor_value_info("A", TensorProto.FLOAT, [m, k])
        inits = [numpy_helper.from_array(rng.standard_normal((k, n)).astype(np.float32), "B")]
        node = helper.make_node("MatMul", ["A", "B"], ["Y"])
        y = helper.make_tensor_value_info("Y", TensorProto.FLOAT, [m, n])
        feeds = {"A": rng.standard_normal((m, k)).astype(np.float32)}
    model = helper.make_model(helper.make_graph([node], "gemm", [a], [y], inits),
                              opset_imports=[helper.make_opsetid("", 21)])  # fmt: skip
    model.ir_version = 10
    onnx.checker.check_model(model)
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    return ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"]), feeds


def measured_gops(threads: int, repeats: int = 10, shape: tuple[int, int, int] = (2048, 1024, 4096)) -> dict:
    """Best-of-N ops/s of a big uint8 x int8 MatMulInteger and an fp32 MatMul, interleaved."""
    m, k, n = shape
    runs = {name: _gemm_session(m, k, n, name == "int8", threads) for name in ("int8", "fp32")}
    best = dict.fromkeys(runs, float("inf"))
    for _ in range(repeats):
        for name, (s, feeds) in runs.items():
            start = time.perf_counter()
            s.run(None, feeds)
            best[name] = min(best[name], time.perf_counter() - start)
    return {name: 2 * m * k * n / t / 1e9 for name, t in best.items()}
