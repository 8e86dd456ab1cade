"""The step models' prompt-dependent inputs: `cond` itself, or, for builds made with
``--precompute-kv``, the cross-attention K/V that kv.onnx computes from it once per prompt (CFG
batch: conditional and unconditional rows together). numpy + onnxruntime only."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort


class PromptFeeds:
    """``feeds(cond)`` -> the inputs every step model of this build takes from the prompt."""

    def __init__(self, folder: Path, manifest: dict[str, Any], options: ort.SessionOptions | None = None) -> None:
        spec = manifest.get("kv")
        self.session = None
        if spec:
            path = str(Path(folder) / spec["model"])
            self.session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])

    def feeds(self, cond: np.ndarray) -> dict[str, np.ndarray]:
        """cond: the CFG batch [2, ...] (conditional row first) as the manifest's `cond` input."""
        if self.session is None:
            return {"cond": cond}
        names = [o.name for o in self.session.get_outputs()]
        return dict(zip(names, self.session.run(None, {"cond": cond}), strict=True))


def select(session: ort.InferenceSession, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The subset of feeds a session takes (onnxruntime refuses unknown names)."""
    return {i.name: feeds[i.name] for i in session.get_inputs()}
