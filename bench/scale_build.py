"""Build at full size: per-step W8A8 models from a .qstats file (FP export over 2 GB, shared weight
file), then verify a subset of the models on onnxruntime's CPU provider; time, peak host memory
(RSS) and disk of each phase go to one JSON file.

    python bench/scale_build.py --stats dit.qstats --out build/ --verify 0,19 --json build.json

One process: the build's peak RSS is read before verification starts.
"""

from __future__ import annotations

import argparse
import faulthandler
import json
import resource
import shutil
import time
from pathlib import Path
from typing import Any

from qexport.progress import Tick


def _peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _disk(folder: Path) -> dict[str, int]:
    return {p.name: p.stat().st_size for p in sorted(folder.iterdir()) if p.is_file()}


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def _emitted(times: list[float], tick: Tick, start: float) -> None:
    if tick.task != "building models" or tick.done == 0:
        return
    name = tick.detail
    times.append(time.perf_counter() - start)
    print(f"  emitted {name} at {times[-1]:.1f}s, RSS {_rss() / 2**30:.2f} GiB, peak RSS {_peak_rss() / 2**30:.2f} GiB",
          flush=True)  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--stats", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--verify", default="0,-1", help="model indexes to verify (-1: the last)")
    parser.add_argument("--prompt", help="prompt / label for verification (default: a built-in one)")
    parser.add_argument("--json", type=Path, required=True)
    parser.add_argument("--device", default="cpu", help="where verify's torch passes run (cuda at full size)")
    parser.add_argument("--keep", action="store_true", help="keep the emitted folder")
    parser.add_argument("--model", help="the model the statistics were calibrated on (a folder they name needs it)")
    parser.add_argument("--trust-model-path", action="store_true", help="load the model folder the statistics name")
    parser.add_argument("--stack-every", type=float, default=0, help="dump the Python stack every N s (0: never)")
    a = parser.parse_args()
    if a.stack_every:  # where a long build spends its time, also when it is killed by a timeout
        faulthandler.dump_traceback_later(a.stack_every, repeat=True)

    from qexport.exporter.build import BuildConfig, build
    from qexport.targets.catalog import get_profile
    from qexport.verification.verify import verify

    from qexport.models.fp_eval import default_prompts
    from qexport.models.registry import ModelRequest
    from qexport.recipe import Recipe

    result: dict[str, Any] = {"stats": str(a.stats)}
    start = time.perf_counter()
    emitted: list[float] = []
    own = ModelRequest(model=a.model, trust_model_path=a.trust_model_path)
    built = build(a.stats, a.out, BuildConfig(recipe=Recipe(), force=True),
                  progress=lambda tick: _emitted(emitted, tick, start), model=own)  # fmt: skip
    disk = _disk(a.out)
    result.update(
        model=built.adapter.model_id,
        parameters=built.adapter.num_parameters,
        fp_weight_bytes=sum(p.numel() * p.element_size() for p in built.adapter.transformer.parameters()),
        models=len(built.ranges),
        build_seconds=built.seconds,
        emitted_at_seconds=emitted,
        build_peak_rss=_peak_rss(),
        disk_bytes=sum(disk.values()),
        files=disk,
        weights_bytes=built.emit.weights_bytes,
        logical_bytes=built.emit.logical_bytes,
        shared_tensors=built.emit.shared_tensors,
        unique_tensors=built.emit.unique_tensors,
    )
    a.json.write_text(json.dumps(result, indent=1))
    n = len(built.ranges)
    only = sorted({int(i) % n for i in a.verify.split(",") if i.strip()})
    prompt = a.prompt or default_prompts(built.adapter)[0]
    t0 = time.perf_counter()
    plans = [r.plan for r in built.ranges]
    profile = get_profile(built.manifest["target"])
    v = verify(a.out, built.adapter, plans, built.manifest, profile, prompt, only=only, device=a.device)
    result.update(verify_models=only, verify_device=a.device, verify_seconds=time.perf_counter() - t0,
                  verification=v.to_json(), peak_rss=_peak_rss())  # fmt: skip
    a.json.write_text(json.dumps(result, indent=1))
    if not a.keep:
        shutil.rmtree(a.out)
    gib = 2**30
    print(f"{result['model']}: {n} models in {built.seconds:.0f}s, peak RSS {result['build_peak_rss'] / gib:.1f} GiB, "
          f"disk {result['disk_bytes'] / gib:.2f} GiB (weights {built.emit.weights_bytes / gib:.2f} GiB, "
          f"FP weights {result['fp_weight_bytes'] / gib:.2f} GiB)")  # fmt: skip
    for m in v.to_json()["models"]:
        print(f"  verify {m['model']}: integer layers {m['integer']}, float {len(m['float'])}, "
              f"cos(sim) {m['cosine_sim']:.6f}, LSB {m['max_lsb_sim']:.2f} <= {m['lsb_bound']:.1f}, "
              f"SQNR fp {m['sqnr_fp_db']:.1f} dB, ok {m['ok']}")  # fmt: skip
    print(f"  verify {result['verify_seconds']:.0f}s, verdict {'PASS' if v.ok else 'FAIL'}")


if __name__ == "__main__":
    main()
