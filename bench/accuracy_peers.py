"""Accuracy vs peers: onnxruntime ``quantize_static`` and AMD Quark ONNX against qexport ASQ and
TSQ+TSW, on one model, the same calibration prompts and the same evaluation noise, in one run.

    python bench/accuracy_peers.py --model tiny-latte --bits W8A8 [--calib-prompts 4] [--eval-prompts 6]

qexport calibrates the prompts per step and builds its models; each peer quantizes the single FP
ONNX (timestep as an input) from the same prompts' per-step denoiser inputs, aggregated over all
steps. Each peer model is wrapped in a one-range manifest folder, so every row runs through the
same sampling loop (`qexport eval`'s code) from the same noise. Quark runs under its own
interpreter (``--quark-python``; see docs/benchmarks.md for why and how to make it).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch
from peers import export_fp_model, folder_bytes, ort_quantize, step_feeds, wrap
from qexport.calib.run import CalibConfig, calibrate
from qexport.calib.store import save
from qexport.exporter.build import BuildConfig, build
from qexport.passes.plan import Smooth
from qexport.verification.evaluate import evaluate

from qexport.models import shapes
from qexport.models.registry import load_model
from qexport.models.sampler import SamplingConfig
from qexport.recipe import basic_recipe

QUARK_SCRIPT = Path(__file__).with_name("quark_quantize.py")


def pick(pool: list[str], n: int, offset: int = 0) -> list[str]:
    step = max(1, len(pool) // n)
    return [pool[(offset + i * step) % len(pool)] for i in range(n)]


def qexport_rows(stats: Path, work: Path, w_bits: int) -> list[tuple[str, Path, float]]:
    rows = []
    for name, smooth, ranges in (("qexport ASQ", Smooth.ASQ, 1), ("qexport TSQ+TSW", Smooth.TSQ, None)):
        out = work / name.replace(" ", "_").replace("+", "p")
        start = time.perf_counter()
        build(stats, out, BuildConfig(recipe=basic_recipe(w_bits=w_bits, smooth=smooth.value, time_ranges=ranges)))
        rows.append((name, out, time.perf_counter() - start))
    return rows


def ort_rows(fp: Path, feeds: list[dict], template: Path, work: Path, w_bits: int) -> tuple[list, dict[str, str]]:
    rows, failed = [], {}
    for method in ("minmax", "percentile"):
        name = f"onnxruntime {'MinMax' if method == 'minmax' else 'Percentile'}"
        model = work / f"ort_{method}" / "q.onnx"
        seconds = ort_quantize(fp, model, feeds, method=method, w_bits=w_bits)
        describe = {"tool": "onnxruntime quantize_static", "calibration": method, "w_bits": w_bits, "a_bits": 8}
        rows.append((name, wrap(template, model, work / f"ort_{method}_folder", describe), seconds))
    try:
        model = work / "ort_sq" / "q.onnx"
        seconds = ort_quantize(fp, model, feeds, method="minmax", w_bits=w_bits, smooth=True)
        describe = {"tool": "onnxruntime quantize_static", "smooth_quant": 0.5, "w_bits": w_bits, "a_bits": 8}
        rows.append(
            ("onnxruntime MinMax +SmoothQuant", wrap(template, model, work / "ort_sq_folder", describe), seconds)
        )
    except Exception as exc:  # the peer's own failure is a result to report
        failed["onnxruntime MinMax +SmoothQuant"] = f"{type(exc).__name__}: {exc}"
    return rows, failed


def quark_rows(python: str, fp: Path, feeds: list[dict], template: Path, work: Path) -> tuple[list, dict[str, str]]:
    rows, failed = [], {}
    npz = work / "feeds.npz"
    np.savez(npz, **{k: np.concatenate([f[k] for f in feeds]) for k in feeds[0]})
    for name, extra in (("Quark MinMax", []), ("Quark MinMax +SmoothQuant", ["--smooth-alpha", "0.5"])):
        model = work / name.replace(" ", "_").replace("+", "p") / "q.onnx"
        model.parent.mkdir(parents=True, exist_ok=True)
        cmd = [python, str(QUARK_SCRIPT), str(fp), str(model), str(npz), *extra]
        run = subprocess.run(cmd, capture_output=True, text=True)
        if run.returncode != 0:
            failed[name] = (run.stderr.strip().splitlines() or ["no output"])[-1]
            continue
        seconds = json.loads(run.stdout.strip().splitlines()[-1])["seconds"]
        describe = {"tool": "amd-quark", "smooth_quant": 0.5 if extra else None, "w_bits": 8, "a_bits": 8}
        rows.append((name, wrap(template, model, work / (model.parent.name + "_folder"), describe), seconds))
    return rows, failed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tiny-latte", choices=["tiny-latte", "tiny-dit"])
    parser.add_argument("--bits", default="W8A8", choices=["W8A8", "W4A8"])
    parser.add_argument("--calib-prompts", type=int, default=4)
    parser.add_argument("--eval-prompts", type=int, default=6)
    parser.add_argument("--seeds", default="0")
    parser.add_argument("--quark-python", default=str(Path(__file__).parents[1] / ".venv-quark" / "bin" / "python"))
    parser.add_argument("--work", type=Path, default=Path("/tmp/qexport-peers"))
    a = parser.parse_args()
    torch.set_num_threads(2)
    ort.set_default_logger_severity(3)
    w_bits = int(a.bits[1])
    work = a.work / f"{a.model}-{a.bits}"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    adapter = load_model(a.model)
    pool = shapes.class_names() if adapter.conditioner.kind == "label" else shapes.eval_prompts()
    calib, held_out = pick(pool, a.calib_prompts), pick(pool, a.eval_prompts, offset=1)
    seeds = [int(s) for s in a.seeds.split(",")]

    start = time.perf_counter()
    stats = work / "calib.qstats"
    save(calibrate(adapter, CalibConfig(prompts=tuple(calib), batch_size=4)).stats, stats)
    qexport_calib = time.perf_counter() - start
    rows = [(n, f, qexport_calib + s) for n, f, s in qexport_rows(stats, work, w_bits)]
    template = rows[0][1]  # the one-range ASQ build: timestep input, same steps and conditioning

    fp = export_fp_model(adapter, work / "fp" / "fp.onnx")
    start = time.perf_counter()
    feeds = step_feeds(adapter, calib, [0], 20, SamplingConfig().cfg)
    peer_calib = time.perf_counter() - start
    peer, failed = ort_rows(fp, feeds, template, work, w_bits)
    if w_bits == 8 and Path(a.quark_python).is_file():
        quark, quark_failed = quark_rows(a.quark_python, fp, feeds, template, work)
        peer += quark
        failed.update(quark_failed)
    elif w_bits == 8:
        failed["Quark"] = f"no Quark interpreter at {a.quark_python} (see docs/benchmarks.md)"
    rows += [(n, f, peer_calib + s) for n, f, s in peer]

    result = evaluate([f for _, f, _ in rows], held_out, seeds)
    print(f"{a.model} {a.bits}: calibration {len(calib)} prompts x 20 steps (peers: the same {len(feeds)} "
          f"denoiser inputs, aggregated); evaluation {len(held_out)} prompts x seeds {a.seeds}, CFG 7")  # fmt: skip
    print(f"{'build':<34}{'PSNR dB':>8}{'judge':>7}{'SQNR/step':>10}{'MiB':>8}{'B/param':>8}{'quant s':>9}")
    fp_judge = "-" if result.fp.adherence is None else f"{result.fp.adherence:.3f}"
    print(f"{'FP (torch)':<34}{'-':>8}{fp_judge:>7}")
    params = adapter.num_parameters
    for name, folder, seconds in rows:
        s = result.builds[str(folder)]
        size = folder_bytes(folder)
        judge = "-" if s.adherence is None else f"{s.adherence:.3f}"
        print(f"{name:<34}{s.psnr_db:>8.2f}{judge:>7}{np.mean(s.step_sqnr_db):>10.1f}{size / 2**20:>8.2f}"
              f"{size / params:>8.3f}{seconds:>9.0f}")  # fmt: skip
    for name, error in failed.items():
        print(f"{name:<34} failed: {error}")
    (work / "result.json").write_text(json.dumps(result.to_json(), indent=2))


if __name__ == "__main__":
    sys.exit(main())
