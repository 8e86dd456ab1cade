"""Prompts -> the `cond` input, from manifest.json alone: the exported caption encoder run by
onnxruntime (vocabulary in the manifest), or the class-label table."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from qexport.errors import QexportError
from qexport.runtime.files import model_path, open_session, run_session
from qexport.tokenizer import tokenize


class Conditioning:
    """encode(prompt) and null(), each batch 1, as the emitted models' `cond` input expects."""

    def __init__(self, folder: Path, manifest: dict[str, Any]) -> None:
        self.spec = manifest.get("conditioning") or {"kind": "external"}
        self.session = None
        if self.spec["kind"] == "caption":
            self.session = open_session(model_path(folder, self.spec["model"]))

    def encode(self, prompt: str) -> np.ndarray:
        kind = self.spec["kind"]
        if kind == "caption" and self.session is not None:
            ids = tokenize([prompt], self.spec["max_tokens"], self.spec["vocab"])
            return np.asarray(run_session(self.session, {"ids": ids}, self.spec["model"])[0], dtype=np.float32)
        if kind == "label":
            return np.array([self._label(prompt)], dtype=np.int64)
        raise QexportError("this build has no conditioning model; feed caption embeddings to the Pipeline directly")

    def null(self) -> np.ndarray:
        if self.spec["kind"] == "label":
            return np.array([self.spec["null"]], dtype=np.int64)
        return self.encode("")

    def _label(self, text: str) -> int:
        names = self.spec["classes"]
        key = text.strip().lower()
        if key in names:
            return int(names.index(key))
        if key.isdigit() and int(key) < self.spec["null"]:
            return int(key)
        raise QexportError(f"unknown class label {text!r}; valid labels: {', '.join(names)}")
