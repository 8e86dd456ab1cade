"""onnxruntime CPU sessions timed side by side (round-robin, so load changes hit every model alike),
and onnxruntime's profiler summed per op type."""

from __future__ import annotations

import json
import tempfile
import time
from collections import Counter
from pathlib import Path

import numpy as np
import onnxruntime as ort

from qexport.runtime.loop import session_options

INTEGER_OPS = ("MatMulIntegerToFloat", "QLinearMatMul", "MatMulInteger", "QGemm", "QLinearConv", "ConvInteger",
               "DynamicQuantizeMatMul")  # fmt: skip


def session(path: Path, threads: int, profile_dir: str | None = None) -> ort.InferenceSession:
    opts = session_options(threads)
    if profile_dir is not None:
        opts.enable_profiling = True
        opts.profile_file_prefix = str(Path(profile_dir) / "ort")
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def round_robin(runs: dict[str, tuple[object, dict]], repeats: int, warmup: int = 2) -> dict[str, list[float]]:
    """Seconds per call for each named callable-with-feeds, interleaved: a, b, c, a, b, c, ..."""
    for _ in range(warmup):
        for call, feeds in runs.values():
            _call(call, feeds)
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(repeats):
        for name, (call, feeds) in runs.items():
            start = time.perf_counter()
            _call(call, feeds)
            times[name].append(time.perf_counter() - start)
    return times


def _call(call: object, feeds: dict) -> None:
    if isinstance(call, ort.InferenceSession):
        call.run(None, feeds)
    else:
        call(**feeds)  # type: ignore[operator]


def op_profile(path: Path, feeds: dict, threads: int, runs: int = 3) -> tuple[dict[str, float], dict[str, int]]:
    """Milliseconds per run summed per op type (onnxruntime's enable_profiling), and node counts."""
    with tempfile.TemporaryDirectory() as tmp:
        s = session(path, threads, tmp)
        s.run(None, feeds)  # warm-up (also profiled; dropped below by counting the last `runs` only)
        for _ in range(runs):
            s.run(None, feeds)
        events = json.loads(Path(s.end_profiling()).read_text())
    per_run = [e for e in events if e.get("cat") == "Session" and e.get("name") == "model_run"]
    cutoff = per_run[-runs]["ts"] if len(per_run) >= runs else 0
    total: Counter[str] = Counter()
    count: Counter[str] = Counter()
    for e in events:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time") and e["ts"] >= cutoff:
            total[e["args"]["op_name"]] += e["dur"] / 1e3 / runs
            count[e["args"]["op_name"]] += 1
    return dict(total), {k: v // runs for k, v in count.items()}


def median_ms(times: list[float]) -> float:
    return 1e3 * float(np.median(times))
