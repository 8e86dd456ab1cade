"""Accuracy of W8A8 builds (plain CW+TW, ASQ, TSQ+TSW) and of W4A8 / W8A16 against FP, in one run.

    python bench/build_matrix.py [--model tiny-latte] [--calib-prompts 8] [--seeds 0] [--work /tmp/qexport-matrix]

Calibrates on the first N evaluation prompts (20 steps, CFG 7), builds each configuration and
evaluates all builds on the 24-prompt evaluation set from the same noise (qexport eval).
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

import torch
from qexport.calib.run import CalibConfig, calibrate
from qexport.calib.store import save
from qexport.exporter.build import BuildConfig, build
from qexport.passes.plan import Smooth
from qexport.verification.evaluate import evaluate

from qexport.models import shapes
from qexport.models.registry import ModelRequest, load_model
from qexport.recipe import basic_recipe
from qexport.summaries import eval_table

CONFIGS = {  # name -> (w_bits, a_bits, smooth, ranges)
    "W8A8 CW+TW": (8, 8, Smooth.NONE, 1),
    "W8A8 CW+TW +TSW": (8, 8, Smooth.NONE, None),
    "W8A8 ASQ": (8, 8, Smooth.ASQ, 1),
    "W8A8 ASQ +TSW": (8, 8, Smooth.ASQ, None),
    "W8A8 TSQ+TSW": (8, 8, Smooth.TSQ, None),
    "W4A8 ASQ": (4, 8, Smooth.ASQ, 1),
    "W8A16 ASQ": (8, 16, Smooth.ASQ, 1),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tiny-latte")
    parser.add_argument("--calib-prompts", type=int, default=8)
    parser.add_argument("--seeds", default="0")
    parser.add_argument("--alpha", type=float, default=0.5)
    parser.add_argument("--only", nargs="*", help="build names to run (default: all)")
    parser.add_argument("--work", type=Path, default=Path("/tmp/qexport-matrix"))
    a = parser.parse_args()
    torch.set_num_threads(2)
    shutil.rmtree(a.work, ignore_errors=True)
    a.work.mkdir(parents=True)
    adapter = load_model(a.model)
    labels = adapter.conditioner.kind == "label"
    pool = shapes.class_names() if labels else shapes.eval_prompts()
    calib = tuple(pool[:: max(1, len(pool) // a.calib_prompts)][: a.calib_prompts])
    start = time.perf_counter()
    stats_path = a.work / "calib.qstats"
    save(calibrate(adapter, CalibConfig(prompts=calib, batch_size=4)).stats, stats_path)
    print(f"calibrated on {len(calib)} prompts in {time.perf_counter() - start:.0f}s")
    folders = []
    own = ModelRequest(model=a.model)  # the model calibrated above, named on this command line
    for name, (w, act, smooth, ranges) in CONFIGS.items():
        if a.only and name not in a.only:
            continue
        out = a.work / name.replace(" ", "_").replace("+", "p")
        recipe = basic_recipe(w_bits=w, a_bits=act, smooth=smooth.value, alpha=a.alpha, time_ranges=ranges)
        t = time.perf_counter()
        build(stats_path, out, BuildConfig(recipe=recipe), model=own)
        print(f"built {name} in {time.perf_counter() - t:.0f}s")
        folders.append((name, out))
    result = evaluate([f for _, f in folders], pool, [int(s) for s in a.seeds.split(",")], model=own).to_json()
    result["builds"] = {name: result["builds"][str(f)] for name, f in folders}
    (a.work / "matrix.json").write_text(json.dumps(result, indent=2))
    print(f"{a.model}: calibration {len(calib)} prompts; evaluation {len(pool)} prompts x seeds {a.seeds}, "
          f"20 steps, CFG 7, alpha {a.alpha}")  # fmt: skip
    for line in eval_table(result):
        print(line)


if __name__ == "__main__":
    main()
