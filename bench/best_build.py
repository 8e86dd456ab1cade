"""Build time and peak memory of the most accurate recipe beside the plain one: each build of the
same statistics in its own process (its own peak host RSS; peak GPU memory where --device is a
GPU), one after the other, so the figures are side by side from one run.

    python bench/best_build.py --stats calib.qstats --device cpu --json best.json
    python bench/best_build.py --stats dit.qstats --device cuda --builds plain=w8a8-tsq-tsw best=w8a8-best

A build is NAME=RECIPE[,KEY=VALUE...] (recipe settings as `qexport build --set` takes them). The
default compares the plain TSQ + TSW build, w8a8-best, and w8a8-best with GPTQ. Nothing is
verified; each build's choices (alpha, shrink per range) and its seconds by stage go to the JSON.
A GPU build (one whose recipe replays the model or solves GPTQ) also records the host memory its process holds
once CUDA and cuBLAS are loaded, before the build starts; a build that replays nothing never loads
CUDA, as a user's plain build does not (checked after it). Of CUDA's memory it records how much of
it is the libraries' mapped files. Beside the peak RSS, the peak of its anonymous part (RssAnon,
sampled every 0.2 s: the memory the build itself allocated, without mapped library and weight files).
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from qexport.summaries import stage_lines

DEFAULT = ("plain=w8a8-tsq-tsw", "best=w8a8-best", "best+gptq=w8a8-best,gptq=on")


def _child(stats: Path, out: Path, spec: str, device: str) -> None:
    import onnxruntime as ort
    import torch
    from qexport.exporter.build import BuildConfig, build

    from qexport.progress import ProgressPrinter
    from qexport.recipe import load_recipe, with_settings
    from qexport.stages import stage_clock

    ort.set_default_logger_severity(3)
    name, *settings = spec.split(",")
    recipe = with_settings(load_recipe(name), settings)
    # a build that replays the model (or solves GPTQ) runs it on the device; one that does not (the plain build) never
    # loads CUDA, and neither does this process for it: its memory is what a user's plain build holds
    uses_device = recipe.replaying() or recipe.target_replays() or any(t.kind == "gptq" for t in recipe.techniques)
    on_gpu = torch.device(device).type == "cuda" and bool(uses_device)
    floor = {"RssAnon": 0, "RssFile": 0}  # host RSS once CUDA and cuBLAS are loaded: what any GPU build holds first
    if on_gpu:
        (torch.ones(64, 64, device=device) @ torch.ones(64, 64, device=device)).sum().item()
        floor = _status()
    peak_anon = [0]
    by_stage: dict[str, int] = {}  # the highest RSS (anonymous and files) sampled in each stage
    stop = threading.Event()

    def sample() -> None:
        while not stop.wait(0.2):
            now = _status()
            peak_anon[0] = max(peak_anon[0], now["RssAnon"])
            where = clock.current or "(between stages)"
            by_stage[where] = max(by_stage.get(where, 0), now["RssAnon"] + now["RssFile"])

    sampler = threading.Thread(target=sample, daemon=True)
    config = BuildConfig(recipe=recipe, force=True, device=device)
    start = time.perf_counter()
    printer = ProgressPrinter()  # progress on stderr, passed through to the parent's
    with stage_clock() as clock:
        sampler.start()  # it reads the clock's open stage
        result = build(stats, out, config, progress=printer)
    printer.close()
    seconds = time.perf_counter() - start
    stop.set()
    sampler.join()
    gpu = torch.cuda.max_memory_allocated() if on_gpu else 0
    if torch.cuda.is_available() and torch.cuda.is_initialized() and not on_gpu:
        sys.exit(f"{spec}: the build loaded CUDA although its recipe replays nothing (not a plain build's memory)")
    choices = [{"alpha": c["alpha"], "act_shrink": c["act_shrink"]} for c in result.manifest["choices"]]
    print(json.dumps({"seconds": seconds, "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
                      "peak_anon": peak_anon[0], "cuda_rss": floor["RssAnon"] + floor["RssFile"],
                      "cuda_rss_file": floor["RssFile"], "peak_gpu": gpu, "models": len(result.ranges),
                      "choices": choices, "stages": clock.seconds,
                      "peak_rss_by_stage": dict(sorted(by_stage.items(), key=lambda kv: -kv[1]))}))  # fmt: skip


def _status() -> dict[str, int]:
    """This process's resident bytes now: anonymous and mapped files (/proc/self/status)."""
    lines = (line.split() for line in Path("/proc/self/status").read_text().splitlines())
    return {f[0].rstrip(":"): int(f[1]) * 1024 for f in lines if f and f[0] in ("RssAnon:", "RssFile:")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--stats", type=Path, required=True, help="a .qstats of a built-in model")
    parser.add_argument("--builds", nargs="+", default=list(DEFAULT), help="NAME=RECIPE[,KEY=VALUE...]")
    parser.add_argument("--device", default="cpu", help="build --device: where the replay runs")
    parser.add_argument("--work", type=Path, default=Path("/tmp/qexport-best-build"))
    parser.add_argument("--json", type=Path, required=True)
    parser.add_argument("--keep", action="store_true", help="keep the builds (WORK/NAME) for qexport eval")
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    a = parser.parse_args()
    if a.child:
        _child(a.stats, Path(a.child[0]), a.child[1], a.device)
        return
    rows: dict[str, dict[str, Any]] = {}
    for build in a.builds:
        name, _, spec = build.partition("=")
        out = a.work / name.replace("+", "_")
        shutil.rmtree(out, ignore_errors=True)
        cmd = [sys.executable, "-P", __file__, "--stats", str(a.stats), "--device", a.device, "--json", str(a.json),
               "--child", str(out), spec]  # fmt: skip
        done = subprocess.run(cmd, stdout=subprocess.PIPE, text=True)
        if done.returncode:
            sys.exit(f"{name}: the build failed (its error is above)")
        rows[name] = {"recipe": spec, **json.loads(done.stdout.strip().splitlines()[-1])}
        # written after every build, so a run stopped midway keeps the builds that finished
        a.json.write_text(json.dumps({"stats": str(a.stats), "device": a.device, "builds": rows}, indent=1))
        if not a.keep:
            shutil.rmtree(out, ignore_errors=True)
        print(f"{name}: {rows[name]['seconds']:.0f} s", flush=True)
    first = next(iter(rows.values()))
    print(f"\n{a.stats.name} on {a.device}, each build in its own process")
    print(f"{'build':<12} {'recipe':<30} {'models':>6} {'wall s':>8} {'x first':>8} {'RSS GiB':>8} {'anon GiB':>8}"
          f" {'GPU GiB':>8} {'CUDA RSS':>9} {'of it files':>11}")  # fmt: skip
    for name, r in rows.items():
        ratio = r["seconds"] / first["seconds"]
        gib = {k: r[k] / 2**30 for k in ("peak_rss", "peak_anon", "peak_gpu", "cuda_rss", "cuda_rss_file")}
        print(f"{name:<12} {r['recipe']:<30} {r['models']:>6} {r['seconds']:>8.1f} {ratio:>8.2f}"
              f" {gib['peak_rss']:>8.2f} {gib['peak_anon']:>8.2f} {gib['peak_gpu']:>8.2f} {gib['cuda_rss']:>9.2f}"
              f" {gib['cuda_rss_file']:>11.2f}")  # fmt: skip
    print("anon: peak anonymous RSS (0.2 s samples); CUDA RSS: the process's host memory once CUDA and cuBLAS")
    print("were loaded, before the build (GPU builds), and of it the mapped library files")
    print("\ntime by stage (exclusive), as qexport build prints it")
    for name, r in rows.items():
        print(name, *stage_lines(r["stages"], r["seconds"]), sep="\n")
    print("\nhighest RSS sampled in each stage (0.2 s samples; the top four), GiB")
    for name, r in rows.items():
        top = list(r.get("peak_rss_by_stage", {}).items())[:4]
        print(f"{name:<12} " + " · ".join(f"{where} {rss / 2**30:.2f}" for where, rss in top))


if __name__ == "__main__":
    main()
