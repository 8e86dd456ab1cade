"""What weights stored as codes into a lookup (codebook, twin-log) cost at run time on onnxruntime CPU,
beside the same model with uniform int4 weights: the file, the session's load time and the step
time, the builds timed round-robin in one run. (Memory after load is not reported: in one process
the allocator reuses what an earlier session freed, so the order decides the figure.)

    python bench/coded_weights.py BUILD [BUILD ...] [--threads 2] [--repeats 20]

Each BUILD is a one-range build folder (its range_00.onnx); the feeds are random latents and the
null conditioning of the manifest's model, batch 2.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from bench.ort_timing import median_ms, round_robin, session
from qexport.models.registry import load_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("builds", type=Path, nargs="+")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=20)
    a = parser.parse_args()
    model_id = json.loads((a.builds[0] / "manifest.json").read_text())["model_id"]
    adapter = load_model(model_id)
    x, t, cond = adapter.example_inputs(batch=2)
    rng = np.random.default_rng(0)
    feeds = {"latents": rng.standard_normal(x.shape).astype(np.float32), "cond": cond.numpy(),
             "timestep": t.numpy()}  # fmt: skip
    runs, rows = {}, []
    for build in a.builds:
        path = build / "range_00.onnx"
        start = time.perf_counter()
        s = session(path, a.threads)
        load_s = time.perf_counter() - start
        takes = {i.name for i in s.get_inputs()}
        runs[build.name] = (s, {k: v for k, v in feeds.items() if k in takes})
        disk = sum(p.stat().st_size for p in build.iterdir() if p.suffix in (".onnx", ".bin")) / 2**20
        rows.append((build.name, disk, load_s))
    times = round_robin(runs, a.repeats)
    print(f"{'build':<24}{'disk MiB':>10}{'load s':>9}{'step ms':>9}")
    for name, disk, load_s in rows:
        print(f"{name:<24}{disk:>10.2f}{load_s:>9.2f}{median_ms(times[name]):>9.1f}")


if __name__ == "__main__":
    main()
