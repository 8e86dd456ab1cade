"""Write emitted ONNX models with one shared external-data file: every initializer of 1 KiB or
more is stored once per distinct content (sha256), so N per-step models whose weights agree
cost about one model of disk."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import onnx
from onnx import numpy_helper

WEIGHTS_FILE = "weights.bin"
MIN_EXTERNAL_BYTES = 64  # per-channel scales and zero points are shared too
ALIGN = 64


@dataclass(frozen=True, kw_only=True)
class EmitSummary:
    models: list[str]
    weights_bytes: int  # the shared file
    logical_bytes: int  # what the models would hold without sharing
    shared_tensors: int
    unique_tensors: int


def _raw(init: onnx.TensorProto) -> bytes:
    if init.HasField("raw_data"):
        return init.raw_data
    return numpy_helper.from_array(numpy_helper.to_array(init)).raw_data


def compact_names(model: onnx.ModelProto) -> None:
    """Drop value_info and give the exporter's intermediate tensors short names (t0, t1, ...).

    Graph inputs/outputs, initializers and qexport's own tensors (named ``layer::role``) keep
    their names; node names lose the exporter's wrapper prefix.
    """
    del model.graph.value_info[:]
    keep = {t.name for t in (*model.graph.input, *model.graph.output, *model.graph.initializer)}
    renames: dict[str, str] = {}
    for node in model.graph.node:
        for name in node.output:
            if name and name not in keep and "::" not in name:
                renames[name] = f"t{len(renames)}"
    for node in model.graph.node:
        node.name = node.name.replace("/denoiser/transformer/", "").replace("/transformer/", "")
        for field in (node.input, node.output):
            for i, name in enumerate(field):
                field[i] = renames.get(name, name)


def write_models(models: list[tuple[str, onnx.ModelProto]], folder: Path) -> EmitSummary:
    """Save each (file name, model) into folder, initializers of 64 bytes and more in the shared weights file."""
    offsets: dict[str, tuple[int, int]] = {}
    logical = shared = 0
    with open(folder / WEIGHTS_FILE, "wb") as f:
        for name, model in models:
            for init in model.graph.initializer:
                raw = _raw(init)
                if len(raw) < MIN_EXTERNAL_BYTES:
                    continue
                logical += len(raw)
                key = hashlib.sha256(raw + bytes(str((init.data_type, list(init.dims))), "ascii")).hexdigest()
                if key in offsets:
                    shared += 1
                else:
                    pad = (-f.tell()) % ALIGN
                    f.write(b"\0" * pad)
                    offsets[key] = (f.tell(), len(raw))
                    f.write(raw)
                offset, length = offsets[key]
                _externalize(init, offset, length)
            compact_names(model)
            onnx.save(model, str(folder / name))
        total = f.tell()
    return EmitSummary(
        models=[n for n, _ in models],
        weights_bytes=total,
        logical_bytes=logical,
        shared_tensors=shared,
        unique_tensors=len(offsets),
    )


def _externalize(init: onnx.TensorProto, offset: int, length: int) -> None:
    for field in ("raw_data", "float_data", "int32_data", "int64_data", "double_data", "uint64_data"):
        init.ClearField(field)
    del init.external_data[:]
    init.data_location = onnx.TensorProto.EXTERNAL
    for key, value in (("location", WEIGHTS_FILE), ("offset", str(offset)), ("length", str(length))):
        entry = init.external_data.add()
        entry.key, entry.value = key, value
