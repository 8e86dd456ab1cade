"""Per-step denoiser latency in onnxruntime CPU: fp32 vs qexport int8 vs onnxruntime-quantizer int8
(and torch FP), with the same files in OpenVINO's CPU runtime beside them, measured round-robin in
one run at each thread count; where the time goes per op type (onnxruntime's profiler) and the
float share of qexport's int8 step; int8 GEMM throughput against this CPU's int8 peak.

    python bench/speed.py [--models tiny-latte,dit-b-2] [--bits 8,4] [--repeats 10] [--threads 2,8]

Each model is calibrated on a few prompts / classes and steps, built by qexport (ASQ, one time
range: the timestep is an input, like the peer's single model) and quantized by onnxruntime's
``quantize_static`` (QDQ, per-channel, MinMax, MatMul/Gemm) from the same denoiser inputs.
OpenVINO (`pip install 'qexport[openvino]'`; its rows are left out without it) compiles each ONNX
file for its CPU plugin at f32 inference precision, so QDQ linears run on its int8 kernels and the
rest in fp32, as in onnxruntime. Targets: qexport int8 >= 3.0x fp32 at 2 threads and >= 2.5x at 8
threads on dit-b-2, float share of the int8 step <= 25 %; never slower than onnxruntime's quantizer
at the same bits.
"""

from __future__ import annotations

import argparse
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import onnxruntime as ort
import torch
from int8_peak import cpu_peak, measured_gops
from ort_timing import INTEGER_OPS, median_ms, op_profile, round_robin, session
from peers import export_fp_model, ort_quantize, step_feeds
from qexport.calib.run import CalibConfig, calibrate
from qexport.calib.store import save
from qexport.exporter.build import BuildConfig, build

from qexport.models.adapter import ModelAdapter
from qexport.models.registry import load_model
from qexport.models.sampler import SamplingConfig
from qexport.recipe import basic_recipe

CALIB = {"tiny-latte": ["a red circle moving left", "a blue square moving up"], "tiny-dit": ["1", "7"],
         "dit-b-2": ["1", "2"]}  # fmt: skip
STEPS = 2  # qexport's per-step model of step 1 is timed on step 1's inputs


def linear_ops(adapter: ModelAdapter, layers: list[str], feeds: dict) -> float:
    """2 x M x K x N summed over the quantized linears, for one denoiser call on `feeds`."""
    modules = dict(adapter.transformer.named_modules())
    total = [0.0]

    def count(module: torch.nn.Module, args: tuple, out: torch.Tensor) -> None:
        total[0] += 2.0 * args[0].numel() * module.out_features

    hooks = [modules[name].register_forward_hook(count) for name in layers]
    with torch.no_grad():
        adapter.denoiser()(*(torch.from_numpy(feeds[k]) for k in ("latents", "timestep", "cond")))
    for h in hooks:
        h.remove()
    return total[0]


def prepare(name: str, work: Path, bits: list[int]) -> tuple[ModelAdapter, dict[str, Path], dict, list[str]]:
    """Calibrate, build qexport int8/int4, export FP, quantize with onnxruntime; returns the model files,
    the feeds of step 1 of the first prompt, and the quantized layers."""
    adapter = load_model(name)
    stats = work / "calib.qstats"
    result = calibrate(adapter, CalibConfig(prompts=tuple(CALIB[name]), sampling=SamplingConfig(steps=STEPS),
                                            batch_size=2))  # fmt: skip
    save(result.stats, stats)
    files = {"onnxruntime fp32": export_fp_model(adapter, work / "fp" / "fp.onnx")}
    feeds = step_feeds(adapter, CALIB[name], [0], STEPS, SamplingConfig().cfg)
    for w in bits:
        build(stats, work / f"qexport_w{w}_tsw", BuildConfig(recipe=basic_recipe(w_bits=w, smooth="asq")))
        files[f"qexport W{w}A8 per-step"] = work / f"qexport_w{w}_tsw" / "step_01.onnx"
        if w == 8:
            build(
                stats, work / f"qexport_w{w}", BuildConfig(recipe=basic_recipe(w_bits=w, smooth="asq", time_ranges=1))
            )
            files[f"qexport W{w}A8 1 range"] = work / f"qexport_w{w}" / "range_00.onnx"
        files[f"onnxruntime-quantizer W{w}A8"] = work / f"ort_w{w}" / "q.onnx"
        ort_quantize(files["onnxruntime fp32"], files[f"onnxruntime-quantizer W{w}A8"], feeds, method="minmax",
                     w_bits=w)  # fmt: skip
    return adapter, files, feeds[1], list(result.stats.layers)


def openvino_runner(path: Path, threads: int) -> Callable[..., Any] | None:
    """The file compiled by OpenVINO's CPU plugin (f32 inference precision, one stream of `threads`
    threads), as a callable of the feeds by name; None without OpenVINO or where it cannot compile it."""
    try:
        import openvino as ov
    except ImportError:
        return None
    core = ov.Core()
    config = {"INFERENCE_PRECISION_HINT": "f32", "INFERENCE_NUM_THREADS": threads, "NUM_STREAMS": 1}
    try:
        compiled = core.compile_model(core.read_model(str(path)), "CPU", config)
    except RuntimeError as e:  # said, and its row left out
        print(f"OpenVINO could not compile {path}: {' '.join(str(e).split())[-160:]}")
        return None
    request = compiled.create_infer_request()

    def run(**feeds: Any) -> None:
        request.infer(feeds)

    return run


def latency_table(
    name: str, adapter: ModelAdapter, files: dict[str, Path], feeds: dict, a: argparse.Namespace, threads: int
) -> None:
    torch.set_num_threads(threads)
    denoiser = adapter.denoiser()
    tensors = {k: torch.from_numpy(v) for k, v in feeds.items()}

    def torch_fp(**kw: torch.Tensor) -> None:
        with torch.no_grad():
            denoiser(kw["latents"], kw["timestep"], kw["cond"])

    runs: dict[str, tuple[object, dict]] = {}
    for k, p in files.items():
        s = session(p, threads)
        runs[k] = (s, {i.name: feeds[i.name] for i in s.get_inputs()})
    runs["torch fp32"] = (torch_fp, tensors)
    for k, p in files.items():  # the same files in OpenVINO, fed what onnxruntime is fed
        ov_run = openvino_runner(p, threads)
        if ov_run is not None:
            runs[k.replace("onnxruntime fp32", "fp32").replace("onnxruntime-", "") + " [openvino]"] = (
                ov_run,
                runs[k][1],
            )
    times = round_robin(runs, a.repeats)
    fp = median_ms(times["onnxruntime fp32"])
    ov_fp = median_ms(times["fp32 [openvino]"]) if "fp32 [openvino]" in times else None
    print(f"\n{name}: {adapter.num_parameters / 1e6:.1f}M params, batch 2, {threads} threads, "
          f"{a.repeats} round-robin repeats")  # fmt: skip
    print(f"{'model':<40}{'median ms':>10}{'min ms':>9}{'x vs fp32':>10}{'x vs its fp32':>14}")
    for k, t in times.items():
        own = ov_fp if k.endswith("[openvino]") and ov_fp else fp
        print(f"{k:<40}{median_ms(t):>10.1f}{1e3 * min(t):>9.1f}{fp / median_ms(t):>10.2f}{own / median_ms(t):>14.2f}")
    print("x vs fp32: against onnxruntime fp32; x vs its fp32: against the fp32 model in the same runtime")
    for w in a.bits:
        ours, peer = median_ms(times[f"qexport W{w}A8 per-step"]), median_ms(times[f"onnxruntime-quantizer W{w}A8"])
        print(f"W{w}A8: qexport / onnxruntime-quantizer time = {ours / peer:.2f} (target <= 1.00)")


def profile_table(files: dict[str, Path], feeds: dict, threads: int, top: int = 14) -> dict[str, dict[str, float]]:
    keep = ("onnxruntime fp32", "qexport W8A8 per-step", "qexport W8A8 1 range", "onnxruntime-quantizer W8A8")
    profiles = {}
    for k in keep:
        inputs = {i.name for i in session(files[k], threads).get_inputs()}
        profiles[k] = op_profile(files[k], {n: v for n, v in feeds.items() if n in inputs}, threads)[0]
    names = list(profiles)
    ops = sorted(
        {op for p in profiles.values() for op in p}, key=lambda op: -max(p.get(op, 0) for p in profiles.values())
    )
    short = [n.replace("onnxruntime-quantizer", "ort-q").replace("onnxruntime ", "ort ").replace("qexport ", "")
             for n in names]  # fmt: skip
    print(f"\nms per step by op type (onnxruntime profiler, {threads} threads, mean of 3 runs)")
    print(f"{'op type':<24}" + "".join(f"{s:>16}" for s in short))
    for op in ops[:top]:
        print(f"{op:<24}" + "".join(f"{profiles[n].get(op, 0):>16.1f}" for n in names))
    for label, pick in (
        ("integer kernels", lambda op: op in INTEGER_OPS),
        ("float (all other)", lambda op: op not in INTEGER_OPS),
    ):
        print(f"{label:<24}" + "".join(f"{sum(v for op, v in profiles[n].items() if pick(op)):>16.1f}" for n in names))
    return profiles


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="tiny-latte,dit-b-2")
    parser.add_argument("--bits", default="8,4")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--threads", default="2,8", help="comma-separated: a latency table for each")
    parser.add_argument("--work", type=Path, default=Path("/tmp/qexport-speed"))
    a = parser.parse_args()
    a.bits = [int(b) for b in a.bits.split(",")]
    threads = [int(t) for t in a.threads.split(",")]
    torch.set_num_threads(threads[0])
    ort.set_default_logger_severity(3)
    peak = cpu_peak()
    gops = measured_gops(threads[0])
    print(f"CPU: {peak.model}, {peak.cores} cores at {peak.ghz:.2f} GHz, widest int8 unit {peak.unit}")
    print(f"int8 peak: theoretical {peak.peak_gops:.0f} GOPS; measured MatMulInteger 2048x1024x4096 "
          f"{gops['int8']:.0f} GOPS (fp32 MatMul {gops['fp32']:.0f} GFLOPS, "
          f"ratio {gops['int8'] / gops['fp32']:.1f}x)")  # fmt: skip
    for name in a.models.split(","):
        work = a.work / name
        shutil.rmtree(work, ignore_errors=True)
        start = time.perf_counter()
        adapter, files, feeds, layers = prepare(name, work, a.bits)
        print(f"\n[{name}] prepared in {time.perf_counter() - start:.0f}s")
        for t in threads:
            latency_table(name, adapter, files, feeds, a, t)
        profiles = profile_table(files, feeds, threads[0])
        int8_ms = sum(v for op, v in profiles["qexport W8A8 per-step"].items() if op in INTEGER_OPS)
        step_ms = sum(profiles["qexport W8A8 per-step"].values())
        if 8 in a.bits and step_ms:
            print(f"float share of qexport's W8A8 per-step model: {100 * (1 - int8_ms / step_ms):.0f} % of its "
                  f"{step_ms:.1f} ms of kernels at {threads[0]} threads (target <= 25 %)")  # fmt: skip
        if 8 in a.bits and int8_ms:
            ops = linear_ops(adapter, layers, feeds)
            print(f"qexport W8A8 int8 GEMMs: {ops / 1e9:.1f} GOP per step in {int8_ms:.1f} ms = "
                  f"{ops / int8_ms / 1e6:.0f} GOPS ({100 * ops / int8_ms / 1e6 / gops['int8']:.0f}% of measured "
                  f"MatMulInteger, {100 * ops / int8_ms / 1e6 / peak.peak_gops:.0f}% of theoretical peak)")  # fmt: skip


if __name__ == "__main__":
    main()
