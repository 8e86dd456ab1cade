"""Text at the edge: a build's tokenizer.json and text-encoder ONNX parts, run with `tokenizers`
and onnxruntime only. A prompt is tokenized as the pipelines do (special tokens added, padded to
the part's max length); a prompt longer than that is refused, not cut."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
from tokenizers import Tokenizer

from qexport.errors import QexportError
from qexport.runtime.files import inside, model_path, open_session, run_session


class TextPart:
    """One shipped tokenizer + text encoder (a manifest entry written by exporter.text_encoders)."""

    def __init__(self, folder: Path, spec: dict[str, Any], options: ort.SessionOptions | None = None) -> None:
        self.spec = spec
        path = inside(folder, spec["tokenizer"])
        try:
            self.tokenizer = Tokenizer.from_file(str(path))
        except Exception as exc:  # tokenizers raises its own Exception on a file it cannot parse
            raise QexportError(f"{spec['tokenizer']} in {folder} is not a tokenizer file `tokenizers` reads "
                               f"({str(exc)[:160]}); rebuild with qexport build") from None  # fmt: skip
        self.tokenizer.no_padding()
        self.tokenizer.no_truncation()
        self.session = open_session(model_path(folder, spec["model"]), options)

    def tokens(self, prompt: str) -> tuple[np.ndarray, np.ndarray]:
        """(input_ids, attention_mask) [1, max_length] int64.

        Raises:
            QexportError: the prompt is longer than the encoder's max length.
        """
        length = int(self.spec["max_length"])
        ids = self.tokenizer.encode(prompt).ids
        if len(ids) > length:
            raise QexportError(
                f"prompt {prompt[:40]!r}... is {len(ids)} tokens; {self.spec['name']} takes at most "
                f"{length}: shorten it"
            )
        pad = length - len(ids)
        return (np.array([ids + [self.spec["pad_id"]] * pad], dtype=np.int64),
                np.array([[1] * len(ids) + [0] * pad], dtype=np.int64))  # fmt: skip

    def encode(self, prompt: str) -> dict[str, np.ndarray]:
        """The encoder's outputs by name, the attention mask as `attention_mask`, and for an encoder
        that reads the mask its outputs with a mask of ones as `<output>:unmasked` (pipelines that
        call it without a mask)."""
        ids, mask = self.tokens(prompt)
        values = self._run(ids, mask)
        if "attention_mask" in self.spec["inputs"]:
            values.update({f"{k}:unmasked": v for k, v in self._run(ids, np.ones_like(mask)).items()})
        return {**values, "attention_mask": mask}

    def _run(self, ids: np.ndarray, mask: np.ndarray) -> dict[str, np.ndarray]:
        feeds = {"input_ids": ids, "attention_mask": mask}
        values = run_session(self.session, {k: feeds[k] for k in self.spec["inputs"]}, self.spec["model"])
        return dict(zip(self.spec["outputs"], values, strict=True))
