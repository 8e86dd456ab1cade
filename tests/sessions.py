"""onnxruntime CPU sessions for the tests, as qexport opens them: int8 products exact on CPUs whose
kernels would clamp them (qexport.runtime.cpu)."""

from __future__ import annotations

import onnxruntime as ort

from qexport.runtime.cpu import exact_int8


def cpu_session(model: str | bytes, options: ort.SessionOptions | None = None) -> ort.InferenceSession:
    """A CPU session of a model path or serialized model."""
    return ort.InferenceSession(model, exact_int8(options or ort.SessionOptions()), providers=["CPUExecutionProvider"])
