"""Calibration overhead: plain FP sampling vs calibrating sampling of the same prompts, side by side.

    python bench/calib_overhead.py [--model tiny-latte] [--prompts 8] [--steps 20] [--batch-size 4] [--threads 2]

Each mode runs in its own process (so peak RSS is its own); time covers the sampling loop only.
Targets: calibration <= 1.25x the time of plain sampling and <= +10% peak memory.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time


def _child(mode: str, model: str, prompts: int, steps: int, batch: int, threads: int, histograms: bool) -> None:
    import torch
    from qexport.calib.run import CalibConfig, calibrate

    from qexport.models import shapes
    from qexport.models.fp_eval import default_prompts
    from qexport.models.registry import load_model
    from qexport.models.sampler import SamplingConfig, sample

    torch.set_num_threads(threads)
    adapter = load_model(model)
    pool = default_prompts(adapter, full=True) if adapter.conditioner.kind == "caption" else shapes.class_names()
    texts = tuple(pool[i * 7 % len(pool)] for i in range(prompts))
    sampling = SamplingConfig(steps=steps)
    start = time.perf_counter()
    if mode == "calib":
        calibrate(adapter, CalibConfig(prompts=texts, sampling=sampling, batch_size=batch, histograms=histograms))
    else:
        cond = adapter.conditioner.encode(list(texts))
        for i in range(0, len(texts), batch):
            sample(adapter, cond[i : i + batch], [0] * len(cond[i : i + batch]), sampling)
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps({"seconds": seconds, "peak_rss": peak}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tiny-latte")
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--histograms", action="store_true")
    parser.add_argument("--child", choices=["plain", "calib"], help=argparse.SUPPRESS)
    a = parser.parse_args()
    if a.child:
        _child(a.child, a.model, a.prompts, a.steps, a.batch_size, a.threads, a.histograms)
        return
    best: dict[str, dict[str, float]] = {}
    for _ in range(a.repeats):
        for mode in ("plain", "calib"):
            cmd = [sys.executable, __file__, "--child", mode, "--model", a.model, "--prompts", str(a.prompts),
                   "--steps", str(a.steps), "--batch-size", str(a.batch_size), "--threads", str(a.threads)]  # fmt: skip
            if a.histograms:
                cmd.append("--histograms")
            out = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.splitlines()[-1])
            prev = best.get(mode)
            best[mode] = out if prev is None or out["seconds"] < prev["seconds"] else prev
    p, c = best["plain"], best["calib"]
    print(f"{a.model}, {a.prompts} prompts x {a.steps} steps, batch {a.batch_size} (+CFG), {a.threads} threads, "
          f"best of {a.repeats}{', histograms' if a.histograms else ''}")  # fmt: skip
    print(f"{'':<22}{'plain sampling':>16}{'calibrating':>14}{'ratio':>8}{'target':>9}")
    print(f"{'time (s)':<22}{p['seconds']:>16.2f}{c['seconds']:>14.2f}{c['seconds'] / p['seconds']:>8.3f}{'<=1.25':>9}")
    mib = 2**20
    ratio = c["peak_rss"] / p["peak_rss"]
    print(f"{'peak RSS (MiB)':<22}{p['peak_rss'] / mib:>16.0f}{c['peak_rss'] / mib:>14.0f}{ratio:>8.3f}{'<=1.10':>9}")


if __name__ == "__main__":
    main()
