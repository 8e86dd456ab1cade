"""What the peer quantizers get in the benchmarks: the single FP ONNX with the timestep as an input,
the per-step denoiser inputs of the calibration prompts (aggregated: a peer has no notion of steps),
onnxruntime's ``quantize_static`` on them, and a one-range manifest folder around any peer model so
``qexport eval`` runs it through the same sampling loop as qexport's builds."""

from __future__ import annotations

import json
import shutil
import tempfile
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
from onnxruntime.quantization import (
    CalibrationDataReader,
    CalibrationMethod,
    QuantFormat,
    QuantType,
    quantize_static,
)
from qexport.exporter.fp_export import EXPORT_OPSET, stamp
from qexport.exporter.manifest import write_manifest

from qexport.models.adapter import ModelAdapter
from qexport.models.sampler import SamplingConfig, sample

PEER_OPS = ["MatMul", "Gemm"]  # the ops that carry weights; what users quantize in a transformer


def export_fp_model(adapter: ModelAdapter, path: Path) -> Path:
    """The FP denoiser as one ONNX (batch 2, inputs latents / timestep / cond), weights beside it."""
    x, t, cond = adapter.example_inputs(batch=2)
    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        raw = Path(tmp) / "fp.onnx"
        torch.onnx.export(adapter.denoiser().float().eval(), (x, t, cond), str(raw), dynamo=False,
                          opset_version=EXPORT_OPSET, input_names=["latents", "timestep", "cond"],
                          output_names=["output"], do_constant_folding=True)  # fmt: skip
        model = onnx.load(str(raw), load_external_data=True)
    stamp(model)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path), save_as_external_data=True, location=path.name + ".data", size_threshold=1024)
    onnx.checker.check_model(str(path))
    return path


def step_feeds(adapter: ModelAdapter, prompts: list[str], seeds: list[int], steps: int, cfg: float) -> list[dict]:
    """Every denoiser call's inputs (batch 2: cond + uncond) while FP-sampling each prompt x seed."""
    feeds: list[dict[str, np.ndarray]] = []

    def grab(module: torch.nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
        cond = kwargs.get("class_labels", kwargs.get("encoder_hidden_states"))
        feeds.append({"latents": args[0].detach().numpy().copy(), "timestep": kwargs["timestep"].numpy().copy(),
                      "cond": cond.detach().numpy().copy()})  # fmt: skip

    handle = adapter.transformer.register_forward_pre_hook(grab, with_kwargs=True)
    try:
        for seed in seeds:
            for prompt in prompts:
                sample(adapter, adapter.conditioner.encode([prompt]), [seed], SamplingConfig(steps=steps, cfg=cfg))
    finally:
        handle.remove()
    return feeds


class FeedReader(CalibrationDataReader):
    """onnxruntime's calibration reader over a list of feeds; set_range lets it calibrate in strides."""

    def __init__(self, feeds: list[dict[str, np.ndarray]]) -> None:
        self.feeds = feeds
        self.set_range(0, len(feeds))

    def set_range(self, start_index: int, end_index: int) -> None:
        self._it: Iterator[dict[str, np.ndarray]] = iter(self.feeds[start_index:end_index])

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._it, None)

    def __len__(self) -> int:
        return len(self.feeds)


def ort_quantize(fp: Path, out: Path, feeds: list[dict], *, method: str, w_bits: int, smooth: bool = False) -> float:
    """onnxruntime ``quantize_static``: QDQ, per-channel int8/int4 weights, uint8 activations.

    method: "minmax" or "percentile" (99.999). Returns the wall time in seconds.
    """
    calib = {"minmax": CalibrationMethod.MinMax, "percentile": CalibrationMethod.Percentile}[method]
    stride = 4  # histogram calibrators keep every intermediate output of a stride in memory
    options: dict[str, Any] = {"CalibStridedMinMax": stride, "ActivationSymmetric": False}
    if smooth:
        options.update(SmoothQuant=True, SmoothQuantAlpha=0.5)
    reader = FeedReader(feeds[: len(feeds) - len(feeds) % stride])
    out.parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    quantize_static(str(fp), str(out), reader, quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8 if w_bits == 8 else QuantType.QInt4,
                    calibrate_method=calib, op_types_to_quantize=PEER_OPS, use_external_data_format=True,
                    extra_options=options)  # fmt: skip
    seconds = time.perf_counter() - start
    onnx.checker.check_model(str(out))
    return seconds


def wrap(template: Path, model: Path, folder: Path, describe: dict[str, Any]) -> Path:
    """A one-range build folder around a peer model: the template's manifest (a qexport build with
    one time range: same inputs, steps, sampler coefficients, conditioning) pointing at `model`."""
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    manifest = json.loads((template / "manifest.json").read_text())
    for f in template.iterdir():  # conditioning (caption encoder) and anything else but the models
        if f.name not in ("manifest.json", manifest["files"]["weights"]) and f.name not in {
            r["model"] for r in manifest["ranges"]
        }:
            shutil.copy(f, folder / f.name)
    loaded = onnx.load(str(model), load_external_data=True)
    onnx.save(loaded, str(folder / "model.onnx"), save_as_external_data=True, location="model.bin",
              size_threshold=1024)  # fmt: skip
    alpha = describe.get("smooth_quant") or 0.0  # the peer's SmoothQuant alpha (0: none)
    manifest["ranges"] = [{"index": 0, "steps": list(range(len(manifest["steps"]))), "model": "model.onnx",
                           "alpha": alpha}]  # fmt: skip
    for step in manifest["steps"]:
        step.update(range=0, model="model.onnx")
    manifest["quantization"] = describe
    manifest["files"] = {"weights": "model.bin", "weights_bytes": (folder / "model.bin").stat().st_size}
    manifest["verification"] = None
    write_manifest(folder, manifest)  # sealed with the folder's files, as every reader checks
    return folder


def folder_bytes(folder: Path) -> int:
    """Bytes of the denoiser models in a build folder (ONNX protos and weight files)."""
    skip = {"text_encoder.onnx"}
    return sum(
        f.stat().st_size for f in folder.iterdir() if f.suffix in (".onnx", ".bin", ".data") and f.name not in skip
    )
