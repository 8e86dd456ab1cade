"""AMD Quark ONNX quantization of one FP model, run under Quark's own interpreter (amd-quark 0.13
pins onnx <= 1.22 and so cannot share qexport's environment, which needs onnx 1.23).

    .venv-quark/bin/python bench/quark_quantize.py FP.onnx OUT.onnx FEEDS.npz [--smooth-alpha 0.5]

FEEDS.npz holds the calibration feeds stacked per input (latents, timestep, cond), one row pair
per denoiser call. W8A8: per-channel symmetric int8 weights, per-tensor asymmetric uint8
activations, MinMax calibration, MatMul / Gemm only (the same choices as the onnxruntime rows).
Prints one JSON line: {"seconds": quantization wall time}.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
from onnxruntime.quantization import CalibrationDataReader
from quark.onnx import ModelQuantizer
from quark.onnx.quantization.config.algorithm import SmoothQuantConfig
from quark.onnx.quantization.config.config import QConfig
from quark.onnx.quantization.config.spec import CalibMethod, Int8Spec, QLayerConfig, QuantGranularity, UInt8Spec


class Reader(CalibrationDataReader):
    def __init__(self, path: str) -> None:
        data = np.load(path)
        n = data["latents"].shape[0] // 2
        self.rows = [{k: data[k][2 * i : 2 * i + 2] for k in data.files} for i in range(n)]
        self.i = 0

    def get_next(self) -> dict | None:
        if self.i >= len(self.rows):
            return None
        self.i += 1
        return self.rows[self.i - 1]

    def rewind(self) -> None:
        self.i = 0


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("fp")
    parser.add_argument("out")
    parser.add_argument("feeds")
    parser.add_argument("--smooth-alpha", type=float)
    a = parser.parse_args()
    weight = Int8Spec(symmetric=True, calibration_method=CalibMethod.MinMax, quant_granularity=QuantGranularity.Channel)
    act = UInt8Spec(symmetric=False, calibration_method=CalibMethod.MinMax)
    algos = [SmoothQuantConfig(alpha=a.smooth_alpha)] if a.smooth_alpha is not None else []
    config = QConfig(
        global_config=QLayerConfig(activation=act, weight=weight),
        algo_config=algos,
        use_external_data_format=True,
        extra_options={"OpTypesToQuantize": ["MatMul", "Gemm"]},
    )
    start = time.perf_counter()
    ModelQuantizer(config).quantize_model(a.fp, a.out, Reader(a.feeds))
    print(json.dumps({"seconds": time.perf_counter() - start}))


if __name__ == "__main__":
    main()
