"""The step models' prompt-dependent inputs: `cond` itself, or, for builds made with
``--precompute-kv``, the cross-attention K/V that kv.onnx computes from it once per prompt (CFG
batch: conditional and unconditional rows together). numpy + onnxruntime only."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from qexport.errors import QexportError
from qexport.runtime.files import model_path, open_session, run_session


class PromptFeeds:
    """``feeds(cond)`` -> the inputs every step model of this build takes from the prompt."""

    def __init__(self, folder: Path, manifest: dict[str, Any], options: ort.SessionOptions | None = None) -> None:
        spec = manifest.get("kv")
        self.session = None
        if spec:
            self.name = spec["model"]
            self.session = open_session(model_path(folder, self.name), options)

    def feeds(self, cond: np.ndarray) -> dict[str, np.ndarray]:
        """cond: the CFG batch [2, ...] (conditional row first) as the manifest's `cond` input."""
        if self.session is None:
            return {"cond": cond}
        names = [o.name for o in self.session.get_outputs()]
        return dict(zip(names, run_session(self.session, select(self.session, {"cond": cond}), self.name), strict=True))


def select(session: ort.InferenceSession, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The subset of feeds a session takes (onnxruntime refuses unknown names).

    Raises:
        QexportError: the session takes an input the feeds lack (a model the manifest does not describe).
    """
    missing = [i.name for i in session.get_inputs() if i.name not in feeds]
    if missing:
        raise QexportError(f"a model of this build takes input {missing[0][:80]!r}, which its manifest does not feed "
                           f"(it feeds {', '.join(sorted(feeds))}); rebuild the folder with qexport build")  # fmt: skip
    return {i.name: feeds[i.name] for i in session.get_inputs()}
