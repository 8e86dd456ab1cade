"""Build cost: wall time and peak memory of ``qexport build`` for 1, 4 and 20 time ranges (and
timestep-wise), each build in its own process (its own peak RSS), round-robin over repeats.

    python bench/build_cost.py [--model tiny-latte] [--ranges 1,4,20,tsw] [--smooth tsq] [--repeats 2]

Calibrates once (4 prompts x 20 steps). Target: 20 ranges <= 3x the time of 1 range.
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import onnxruntime as ort

from qexport.models import shapes


def _child(stats: Path, out: Path, ranges: str, smooth: str, model: str) -> None:
    from qexport.exporter.build import BuildConfig, build

    from qexport.models.registry import ModelRequest
    from qexport.recipe import basic_recipe

    config = BuildConfig(recipe=basic_recipe(smooth=smooth, time_ranges=None if ranges == "tsw" else int(ranges)))
    start = time.perf_counter()
    result = build(stats, out, config, model=ModelRequest(model=model))  # the model main() calibrated
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps({"seconds": seconds, "peak_rss": peak, "models": len(result.ranges)}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tiny-latte")
    parser.add_argument("--ranges", default="1,4,20,tsw")
    parser.add_argument("--smooth", default="tsq", choices=["none", "asq", "tsq"])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--work", type=Path, default=Path("/tmp/qexport-buildcost"))
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    parser.add_argument("--stats", type=Path, help=argparse.SUPPRESS)
    a = parser.parse_args()
    ort.set_default_logger_severity(3)
    if a.child:
        _child(a.stats, Path(a.child[0]), a.child[1], a.smooth, a.model)
        return
    shutil.rmtree(a.work, ignore_errors=True)
    a.work.mkdir(parents=True)
    stats = a.work / "calib.qstats"
    from qexport.calib.run import CalibConfig, calibrate
    from qexport.calib.store import save

    from qexport.models.registry import load_model

    adapter = load_model(a.model)
    pool = shapes.class_names() if adapter.conditioner.kind == "label" else shapes.eval_prompts()
    save(calibrate(adapter, CalibConfig(prompts=tuple(pool[::6][:4]), batch_size=4)).stats, stats)
    kinds = a.ranges.split(",")
    best: dict[str, dict] = {}
    for r in range(a.repeats):
        for kind in kinds:
            out = a.work / f"out_{kind}_{r}"
            cmd = [sys.executable, __file__, "--child", str(out), kind, "--stats", str(stats), "--smooth", a.smooth,
                   "--model", a.model]  # fmt: skip
            run = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.splitlines()[-1])
            shutil.rmtree(out)
            if kind not in best or run["seconds"] < best[kind]["seconds"]:
                best[kind] = run
    base = best[kinds[0]]["seconds"]
    print(f"{a.model}: qexport build W8A8 --smooth {a.smooth}, calibrated 4 prompts x 20 steps; best of {a.repeats}, "
          f"each build in its own process")  # fmt: skip
    print(f"{'ranges':<16}{'models':>7}{'wall s':>9}{'x 1 range':>10}{'peak RSS MiB':>14}")
    for kind in kinds:
        b = best[kind]
        name = "timestep-wise" if kind == "tsw" else kind
        print(
            f"{name:<16}{b['models']:>7}{b['seconds']:>9.1f}{b['seconds'] / base:>10.2f}{b['peak_rss'] / 2**20:>14.0f}"
        )
    if "20" in best:
        print(f"20 ranges / 1 range = {best['20']['seconds'] / base:.2f} (target <= 3.00)")


if __name__ == "__main__":
    main()
