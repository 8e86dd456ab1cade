"""Export what the edge loop needs to condition without torch: the caption encoder as ONNX (with
its vocabulary), or the class-label table."""

from __future__ import annotations

import tempfile
import warnings
from pathlib import Path
from typing import Any

import onnx
import torch
from qexport.exporter.fp_export import stamp

from qexport.models.adapter import ModelAdapter
from qexport.models.conditioning import CaptionConditioner, LabelConditioner
from qexport.tokenizer import MAX_TOKENS, VOCAB

ENCODER_FILE = "text_encoder.onnx"


def export_conditioning(adapter: ModelAdapter, folder: Path) -> dict[str, Any]:
    """Write the conditioning model (if any) into folder; returns the manifest's `conditioning`."""
    c = adapter.conditioner
    if isinstance(c, CaptionConditioner):
        ids = torch.zeros(1, MAX_TOKENS, dtype=torch.long)
        with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
            warnings.simplefilter("ignore")
            path = Path(tmp) / ENCODER_FILE
            torch.onnx.export(c.encoder.eval(), (ids,), str(path), dynamo=False, opset_version=20,
                              input_names=["ids"], output_names=["embeddings"])  # fmt: skip
            model = onnx.load(str(path))
        stamp(model)
        onnx.save(model, str(folder / ENCODER_FILE))
        return {"kind": "caption", "model": ENCODER_FILE, "vocab": list(VOCAB), "max_tokens": MAX_TOKENS}
    if isinstance(c, LabelConditioner):
        return {"kind": "label", "classes": c.names, "null": c.num_classes}
    return {"kind": "external", "note": "feed caption embeddings yourself (no encoder in the model folder)"}
