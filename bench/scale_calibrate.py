"""Calibration at full size on a GPU: plain FP sampling vs calibrating sampling, same prompts,
same process, alternating, best of N; time per denoiser step and peak GPU memory of each.

    python bench/scale_calibrate.py run --model dit-xl-2 --prompts 32 --batch-size 16 --json out.json
    python bench/scale_calibrate.py table out/*.json

Random-init weights of the named full-size configs (no checkpoint can be downloaded here).
Targets: calibration <= 1.15x the time of plain sampling and <= +5% peak GPU memory.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any


def _prompts(adapter: Any, n: int) -> tuple[str, ...]:
    from qexport.models.fp_eval import default_prompts

    if adapter.conditioner.kind == "label":
        return tuple(str(i * 37 % adapter.conditioner.num_classes) for i in range(n))
    if adapter.conditioner.synthetic:  # random-init full-size models: stand-in caption embeddings
        return tuple(f"a scene number {i}" for i in range(n))
    pool = default_prompts(adapter, full=True)
    return tuple(pool[i * 7 % len(pool)] for i in range(n))


def _timed(fn: Any, device: Any) -> dict[str, float]:
    import torch

    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    fn()
    if cuda:
        torch.cuda.synchronize(device)
    row = {"seconds": time.perf_counter() - start}
    if cuda:
        row["peak_allocated"] = torch.cuda.max_memory_allocated(device)
        row["peak_reserved"] = torch.cuda.max_memory_reserved(device)
    return row


def run(a: argparse.Namespace) -> dict[str, Any]:
    """Warm up, then alternate plain / calibrating runs; keep each mode's fastest run."""
    import torch
    from qexport.calib.run import CalibConfig, calibrate

    from qexport.models.registry import load_model
    from qexport.models.sampler import SamplingConfig, autocast_dtype, sample

    t0 = time.perf_counter()
    adapter = load_model(a.model)
    load_s = time.perf_counter() - t0
    device = torch.device(a.device)
    adapter.transformer.to(device)
    dtype = autocast_dtype(a.dtype, device)
    prompts = _prompts(adapter, a.prompts)
    cond = adapter.conditioner.encode(list(prompts))

    def plain(steps: int = a.steps) -> None:
        config = SamplingConfig(steps=steps, cfg=7.0)
        for i in range(0, len(prompts), a.batch_size):
            part = cond[i : i + a.batch_size]
            sample(adapter, part, [0] * len(part), config, device=device, dtype=dtype)

    def calib(steps: int = a.steps) -> None:
        config = CalibConfig(prompts=prompts, sampling=SamplingConfig(steps=steps, cfg=7.0),
                             batch_size=a.batch_size, device=a.device, dtype=a.dtype)  # fmt: skip
        calibrate(adapter, config)

    _timed(lambda: plain(2), device)  # warm-up: kernels, handles, allocator
    _timed(lambda: calib(2), device)
    rows: dict[str, list[dict[str, float]]] = {"plain": [], "calib": []}
    for _ in range(a.repeats):
        rows["plain"].append(_timed(plain, device))
        rows["calib"].append(_timed(calib, device))
    calls = a.steps * -(-len(prompts) // a.batch_size)
    best = {mode: min(r, key=lambda x: x["seconds"]) for mode, r in rows.items()}
    result: dict[str, Any] = {
        "model": a.model,
        "parameters": adapter.num_parameters,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "autocast": str(dtype).removeprefix("torch.") if dtype else "float32",
        "prompts": len(prompts),
        "batch_size": a.batch_size,
        "rows_per_call": 2 * min(a.batch_size, len(prompts)),
        "steps": a.steps,
        "denoiser_calls": calls,
        "repeats": a.repeats,
        "load_seconds": load_s,
        "runs": rows,
        "best": best,
        "ms_per_step": {mode: 1e3 * b["seconds"] / calls for mode, b in best.items()},
        "time_ratio": best["calib"]["seconds"] / best["plain"]["seconds"],
    }
    if device.type == "cuda":
        peak = {mode: max(x["peak_allocated"] for x in r) for mode, r in rows.items()}
        result["peak_allocated"] = peak
        result["memory_ratio"] = peak["calib"] / peak["plain"]
    return result


def table(paths: list[Path]) -> list[str]:
    """Markdown rows, one per result file."""
    lines = [
        "| model | params | rows/call | ms/step plain | ms/step calib | time ratio | peak GiB plain | peak GiB calib "
        "| memory ratio |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    gib = 2**30
    for p in paths:
        r = json.loads(p.read_text())
        ms, peak = r["ms_per_step"], r.get("peak_allocated", {"plain": 0, "calib": 0})
        lines.append(
            f"| {r['model']} | {r['parameters'] / 1e6:.0f} M | {r['rows_per_call']} | {ms['plain']:.1f} | "
            f"{ms['calib']:.1f} | **{r['time_ratio']:.3f}** | {peak['plain'] / gib:.2f} | {peak['calib'] / gib:.2f} | "
            f"**{r.get('memory_ratio', float('nan')):.3f}** |"
        )
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run", help="one model: plain vs calibrating, best of --repeats")
    r.add_argument("--model", default="dit-xl-2")
    r.add_argument("--device", default="cuda")
    r.add_argument("--dtype", default="auto")
    r.add_argument("--prompts", type=int, default=32)
    r.add_argument("--batch-size", type=int, default=16)
    r.add_argument("--steps", type=int, default=20)
    r.add_argument("--repeats", type=int, default=3)
    r.add_argument("--json", type=Path, required=True)
    t = sub.add_parser("table", help="markdown table of result files")
    t.add_argument("files", nargs="+", type=Path)
    a = parser.parse_args()
    if a.cmd == "table":
        print("\n".join(table(a.files)))
        return
    result = run(a)
    a.json.parent.mkdir(parents=True, exist_ok=True)
    a.json.write_text(json.dumps(result, indent=1))
    print("\n".join(table([a.json])))


if __name__ == "__main__":
    main()
