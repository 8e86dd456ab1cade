"""Run an emitted model in OpenVINO's CPU runtime (a second real runtime besides onnxruntime) and
read, off the compiled model, which quantized layers execute in u8/i8. Imports openvino lazily:
it is an optional dependency (``pip install qexport[openvino]``)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from qexport.verification.emitted import matmul_outputs

from qexport.errors import QexportError

LOW_PRECISION = ("u8", "i8")
LINEAR_LAYERS = ("FullyConnected", "MatMul", "Convolution", "Gemm")


@dataclass(kw_only=True)
class OpenVinoRun:
    output: np.ndarray
    integer: list[str] = field(default_factory=list)
    emulated: list[str] = field(default_factory=list)
    float_: list[str] = field(default_factory=list)


def _core() -> Any:
    try:
        import openvino as ov
    except ImportError:
        raise QexportError("--runtime openvino needs OpenVINO: pip install 'qexport[openvino]'") from None
    return ov.Core()


def run_openvino(
    path: Path, feeds: dict[str, np.ndarray], layers: list[str], ids: dict[str, str], expected: set[str]
) -> OpenVinoRun:
    """Compile for CPU in float32 inference precision, run once, classify the quantized layers.

    A layer is integer when the compiled node holding its MatMul runs in u8/i8; otherwise float (a
    failure) where `expected` says the runtime has an integer kernel for it, else emulated.
    """
    core = _core()
    compiled = core.compile_model(core.read_model(str(path)), "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    result = compiled(feeds)
    output = np.asarray(result[compiled.output(0)])
    precision: dict[str, str] = {}
    for op in compiled.get_runtime_model().get_ordered_ops():
        info = op.get_rt_info()
        if info["layerType"].astype(str) not in LINEAR_LAYERS:
            continue
        for original in info["originalLayersNames"].astype(str).split(","):
            precision[original.strip()] = info["runtimePrecision"].astype(str)
    run = OpenVinoRun(output=output)
    outputs = matmul_outputs(path, layers, ids)
    for layer in layers:
        tensor = outputs.get(layer, "")
        # a fused node lists the ONNX tensors it absorbed, e.g. "t12" or "t12/DequantizationMultiply"
        held = [p for name, p in precision.items() if name == tensor or name.startswith(f"{tensor}/")]
        if tensor and held and all(p in LOW_PRECISION for p in held):
            run.integer.append(layer)
        elif layer in expected:
            run.float_.append(layer)
        else:
            run.emulated.append(layer)
    return run
