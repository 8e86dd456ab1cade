"""Write emitted ONNX models with one shared external-data file: every initializer of 1 KiB or
more is stored once per distinct content (sha256), so N per-step models whose weights agree
cost about one model of disk."""

from __future__ import annotations

import hashlib
import mmap
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper

WEIGHTS_FILE = "w.bin"
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


def layer_ids(layers: list[str]) -> dict[str, str]:
    """Short ids for quantized layers (L0, L1, ...); the manifest keeps the table."""
    return {layer: f"L{i}" for i, layer in enumerate(layers)}


def compact_names(model: onnx.ModelProto, ids: dict[str, str]) -> None:
    """Make a per-step file small: drop value_info and node names, rename tensors to short ids.

    Graph inputs and outputs keep their names; qexport's own tensors ``layer::role`` become
    ``L<i>:role`` (see the manifest's layer table); every other tensor becomes t<i>.
    """
    del model.graph.value_info[:]
    keep = {t.name for t in (*model.graph.input, *model.graph.output)}
    renames: dict[str, str] = {}

    def short(name: str) -> str:
        if not name or name in keep:
            return name
        if name not in renames:
            owner, sep, role = name.partition("::")
            renames[name] = f"{ids[owner]}:{role}" if sep and owner in ids else f"t{len(renames)}"
        return renames[name]

    for init in model.graph.initializer:
        init.name = short(init.name)
    for node in model.graph.node:
        node.name = ""
        for field in (node.input, node.output):
            for i, name in enumerate(field):
                field[i] = short(name)


Entry = tuple[int, int, int, list[int]]  # a tensor in the weights file: offset, length, ONNX type, dims
Views = dict[tuple[int, int, tuple[int, ...]], np.ndarray]


class ModelWriter:
    """Writes models one at a time into folder, sharing the weights file; nothing is kept in memory
    but the offsets of the tensors written so far (a full-size build streams its models)."""

    def __init__(self, folder: Path, ids: dict[str, str]) -> None:
        self.folder, self.ids = folder, ids
        self.offsets: dict[str, tuple[int, int]] = {}
        self.last: dict[str, Entry] = {}  # the last model's tensors in the weights file
        self.names: list[str] = []
        self._views: Views = {}
        self.logical = self.shared = 0
        self._file = open(folder / WEIGHTS_FILE, "wb")  # noqa: SIM115 (closed by close())

    def add(self, name: str, model: onnx.ModelProto) -> None:
        """Save model as folder/name; its initializers of 64 bytes and more (int64 ones excepted)
        go to the shared file."""
        f = self._file
        compact_names(model, self.ids)
        self.last = {}
        for init in model.graph.initializer:
            if init.data_type == onnx.TensorProto.INT64:
                continue  # shapes, axes, indices: onnxruntime's shape inference reads them from the model
            raw = _raw(init)
            if len(raw) < MIN_EXTERNAL_BYTES:
                continue
            self.logical += len(raw)
            key = hashlib.sha256(raw + bytes(str((init.data_type, list(init.dims))), "ascii")).hexdigest()
            if key in self.offsets:
                self.shared += 1
            else:
                f.write(b"\0" * ((-f.tell()) % ALIGN))
                self.offsets[key] = (f.tell(), len(raw))
                f.write(raw)
            offset, length = self.offsets[key]
            self.last[init.name] = (offset, length, init.data_type, list(init.dims))
            _externalize(init, offset, length)
        onnx.save(model, str(self.folder / name))
        self.names.append(name)

    def written(self) -> dict[str, np.ndarray]:
        """The last model's tensors in the weights file (compacted names), as read-only arrays mapped
        from it (packed 4-bit tensors left out; a tensor shared with an earlier model is the same
        array): what a caller keeps of them can point there instead of holding a copy in memory."""
        if not self.last:
            return {}
        self._file.flush()
        return mapped_tensors(self.folder / WEIGHTS_FILE, self.last, self._views)

    def close(self) -> EmitSummary:
        total = self._file.tell()
        self._file.close()
        return EmitSummary(
            models=list(self.names),
            weights_bytes=total,
            logical_bytes=self.logical,
            shared_tensors=self.shared,
            unique_tensors=len(self.offsets),
        )


def mapped_tensors(weights: Path, entries: dict[str, Entry], views: Views) -> dict[str, np.ndarray]:
    """Tensors of the weights file as read-only arrays mapped from it (one mapping per call; packed
    4-bit tensors left out); `views` caches them by place, so a tensor two models share is one array."""
    with open(weights, "rb") as f:
        mapped = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    out = {}
    for name, (offset, length, kind, dims) in entries.items():
        dtype = np.dtype(helper.tensor_dtype_to_np_dtype(kind))
        if kind in (onnx.TensorProto.INT4, onnx.TensorProto.UINT4) or length != dtype.itemsize * int(np.prod(dims)):
            continue
        key = (offset, kind, tuple(dims))
        if key not in views:
            views[key] = np.frombuffer(mapped, dtype, length // dtype.itemsize, offset).reshape(dims)
        out[name] = views[key]
    return out


def emitted_tensors(folder: Path, model_file: str, views: Views) -> dict[str, np.ndarray]:
    """The tensors an emitted model of folder keeps in its weights file, mapped (mapped_tensors)."""
    model = onnx.load(str(folder / model_file), load_external_data=False)
    entries = {}
    for init in model.graph.initializer:
        place = {e.key: e.value for e in init.external_data}
        if init.data_location == onnx.TensorProto.EXTERNAL and place.get("location") == WEIGHTS_FILE:
            entries[init.name] = (int(place["offset"]), int(place["length"]), init.data_type, list(init.dims))
    return mapped_tensors(folder / WEIGHTS_FILE, entries, views) if entries else {}


def write_models(models: list[tuple[str, onnx.ModelProto]], folder: Path, ids: dict[str, str]) -> EmitSummary:
    """Save each (file name, model) into folder, initializers of 64 bytes and more in the shared weights file."""
    writer = ModelWriter(folder, ids)
    try:
        for name, model in models:
            writer.add(name, model)
    finally:
        summary = writer.close()
    return summary


def _externalize(init: onnx.TensorProto, offset: int, length: int) -> None:
    for field in ("raw_data", "float_data", "int32_data", "int64_data", "double_data", "uint64_data"):
        init.ClearField(field)
    del init.external_data[:]
    init.data_location = onnx.TensorProto.EXTERNAL
    for key, value in (("location", WEIGHTS_FILE), ("offset", str(offset)), ("length", str(length))):
        entry = init.external_data.add()
        entry.key, entry.value = key, value
