"""The .qstats file: tensors in safetensors, a JSON header (with a sha256 per tensor) in its metadata
and a sha256 of that header beside it. ``load`` checks, before anything reads the statistics, the
file's size, the header's digest and schema, the tensor table, every tensor's digest and the
statistics' ranges: a truncated, corrupted, foreign or edited file is one QexportError line."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import RootModel
from qexport.calib.qstats_schema import (
    FORMAT,
    SAFETENSORS_DTYPES,
    VERSION,
    Header,
    Metadata,
    SafetensorsEntry,
    header_model,
    layout,
    problem,
)
from qexport.calib.stats import LayerStats, merge
from safetensors import SafetensorError
from safetensors.numpy import load_file, save_file

from qexport.errors import QexportError
from qexport.media import atomic_write
from qexport.schema import canonical, parse_json, validate

__all__ = ["FORMAT", "VERSION", "QStats", "check_matches", "load", "merge_all", "save"]

RUN_KEYS = ("model_id", "config_hash", "steps", "timesteps", "cfg", "histograms")
DIGEST_KEY = "qexport_sha256"  # metadata key of the header's digest
MAX_FILE_BYTES = 64 << 30  # 1000 layers x 100 steps x 16384 channels of statistics is ~26 GB
MAX_HEADER_BYTES = 32 << 20  # the safetensors JSON (tensor table and our header): ~0.1 MB for 500 layers
FIX = "recreate it with qexport calibrate"


class _Table(RootModel[dict[str, SafetensorsEntry]]):
    """The safetensors tensor table: name -> dtype, shape, data offsets."""


@dataclass(kw_only=True)
class QStats:
    """Header (what was run, on which model) and per-layer statistics."""

    header: dict[str, Any]
    layers: dict[str, LayerStats]

    @property
    def steps(self) -> int:
        return int(self.header["steps"])

    @property
    def model_id(self) -> str:
        return str(self.header["model_id"])


def tensor_digest(name: str, array: np.ndarray) -> str:
    """sha256 over a tensor's name, dtype and shape (canonical JSON), then its raw bytes."""
    h = hashlib.sha256(canonical([name, str(array.dtype), list(array.shape)]))
    h.update(np.ascontiguousarray(array).data)
    return h.hexdigest()


def header_digest(text: str) -> str:
    """sha256 of the header's JSON text exactly as stored (UTF-8; an escaped lone surrogate, which no
    writer produces, kept as its code point so that it hashes rather than raises)."""
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()


def _arrays(stats: QStats) -> dict[str, np.ndarray]:
    tensors: dict[str, np.ndarray] = {}
    for name, s in stats.layers.items():
        tensors[f"{name}::min"] = s.minimum
        tensors[f"{name}::max"] = s.maximum
        tensors[f"{name}::channel_min"] = s.channel_min
        tensors[f"{name}::channel_max"] = s.channel_max
        tensors[f"{name}::absmax_sum"] = s.absmax_sum
        tensors[f"{name}::count"] = s.count
        tensors[f"{name}::asq_z"] = s.asq_z
        tensors[f"{name}::asq_n"] = np.asarray([s.asq_n], dtype=np.int64)
        if s.hist is not None:
            tensors[f"{name}::hist"] = s.hist
        if s.hist_range is not None:
            tensors[f"{name}::hist_range"] = s.hist_range
    return {k: np.ascontiguousarray(v) for k, v in tensors.items()}


def save(stats: QStats, path: Path) -> int:
    """Check the statistics as ``load`` will, then write atomically (temp file, then rename).

    Returns:
        The file size in bytes.

    Raises:
        QexportError: a header or a tensor that ``load`` would refuse (naming the field or layer).
    """
    path = Path(path)
    source, fix = f"statistics for {path}", "the code that built them wrote a value a .qstats file cannot hold"
    try:
        header = json.loads(json.dumps(stats.header, allow_nan=False))  # plain JSON data, as load will see it
    except (TypeError, ValueError) as exc:  # not JSON, or NaN / Infinity
        raise QexportError(f"{source}: the header is not plain JSON ({str(exc)[:120]}); {fix}") from None
    arrays = _arrays(stats)
    header["tensors"] = {k: tensor_digest(k, a) for k, a in arrays.items()}
    model = validate(header_model(header), header, f"{source}: header", fix)
    if set(stats.layers) != set(model.layers):  # load lists them in the header's order
        raise QexportError(f"{source}: the header's layers are not the statistics' layers; {fix}")
    expected = layout(model)
    for name in expected.keys() | arrays.keys():
        want = expected.get(name, ("none", ()))
        got = (str(arrays[name].dtype), arrays[name].shape) if name in arrays else ("none", ())
        if got != want:
            raise QexportError(f"{source}: tensor {name!r} is {got[0]} {list(got[1])}, "
                               f"expected {want[0]} {list(want[1])}; {fix}")  # fmt: skip
    for name, s in stats.layers.items():
        if (why := problem(s)) is not None:
            raise QexportError(f"{source}: layer {name!r}: {why}; {fix}")
    text = json.dumps(header)  # ASCII; key order kept (the layers' order is the model's)
    metadata = {"qexport": text, DIGEST_KEY: header_digest(text)}
    atomic_write(path, lambda tmp: save_file(arrays, tmp, metadata=metadata))
    return path.stat().st_size


def load(path: Path) -> QStats:
    """Read a .qstats file, checking it whole before anything uses it (see the module doc).

    Raises:
        QexportError: a missing, truncated, corrupted, foreign or edited file, or another version:
            one line naming the file and the field, tensor or layer.
    """
    path = Path(path)
    if not path.is_file():
        raise QexportError(f"statistics file {path} does not exist; create it with qexport calibrate -o {path}")
    size, header_bytes, table, metadata = _read_table(path)
    header, model = _read_header(path, metadata)
    _check_table(path, table, model, 8 + header_bytes, size)
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError) as exc:  # the table was checked: what is left is the data itself
        raise QexportError(f"{path} is truncated or corrupted ({str(exc)[:120]}); {FIX}") from None
    for name, array in tensors.items():
        if tensor_digest(name, array) != model.tensors[name]:
            raise QexportError(f"{path}: tensor {name!r} does not match its digest (file corrupted); {FIX}")
    layers = {}
    for name, info in model.layers.items():
        layers[name] = _layer(tensors, name, info.in_features)
        if (why := problem(layers[name])) is not None:
            raise QexportError(f"{path}: layer {name!r}: {why}; {FIX}")
    header.pop("tensors")
    return QStats(header=header, layers=layers)


def _read_table(path: Path) -> tuple[int, int, dict[str, SafetensorsEntry], Metadata]:
    """The file size, the safetensors header's length, its tensor table and our metadata."""
    not_qstats = f"{path} is not a .qstats file"
    try:
        size = path.stat().st_size
        if size > MAX_FILE_BYTES:
            raise QexportError(f"{path} is {size} bytes, more than the {MAX_FILE_BYTES} a .qstats file can be; {FIX}")
        with open(path, "rb") as f:
            prefix = f.read(8)
            n = int.from_bytes(prefix, "little")
            if len(prefix) < 8 or not 2 <= n <= min(MAX_HEADER_BYTES, size - 8):
                raise QexportError(
                    f"{not_qstats} (its safetensors header length {n} does not fit a file of {size} bytes); {FIX}"
                )
            raw = f.read(n)
    except OSError as exc:
        raise QexportError(f"cannot read {path} ({exc.strerror or exc}); {FIX}") from None
    outer = parse_json(raw, f"{not_qstats}: its safetensors header", FIX, max_depth=3)
    if not isinstance(outer, dict) or not isinstance(outer.get("__metadata__"), dict):
        raise QexportError(f"{not_qstats} (no safetensors metadata); {FIX}")
    if "qexport" not in outer["__metadata__"]:
        raise QexportError(f"{not_qstats} (no qexport header in its metadata); {FIX}")
    metadata = validate(Metadata, outer.pop("__metadata__"), f"{path}: safetensors metadata", FIX)
    table = validate(_Table, outer, f"{path}: tensor table", FIX).root
    return size, n, table, metadata


def _read_header(path: Path, metadata: Metadata) -> tuple[dict[str, Any], Header]:
    """Our header: its digest first (a flipped bit is corruption, whatever field it hit), then the
    format and version, then the schema."""
    if metadata.qexport_sha256 is not None and header_digest(metadata.qexport) != metadata.qexport_sha256:
        raise QexportError(f"{path}: the qexport header does not match its digest (file corrupted); {FIX}")
    header = parse_json(metadata.qexport, f"{path}: the qexport header", FIX)
    if not isinstance(header, dict):
        raise QexportError(f"{path}: the qexport header is not a JSON object; {FIX}")
    if header.get("format") != FORMAT:
        raise QexportError(f"{path} is not a .qstats file (format {header.get('format')!r:.60}, not {FORMAT!r}); {FIX}")
    version, tool = header.get("version"), header.get("tool_version")
    if version == 1 and type(version) is int:
        raise QexportError(
            f"{path} is a version 1 .qstats file (qexport {tool!r:.20}), which has no digests; this qexport reads "
            f"version {VERSION}: recalibrate with qexport calibrate -o {path}"
        )
    if version != VERSION or type(version) is not int:
        raise QexportError(
            f"{path} has .qstats version {version!r:.20} (tool {tool!r:.20}); this qexport reads version {VERSION}: "
            "recalibrate with this version"
        )
    if metadata.qexport_sha256 is None:
        raise QexportError(f"{path}: the qexport header has no digest (file corrupted or edited); {FIX}")
    return header, validate(header_model(header), header, f"{path}: header", FIX)


def _check_table(path: Path, table: dict[str, SafetensorsEntry], model: Header, data_start: int, size: int) -> None:
    """Every tensor the header implies is in the table with its dtype and shape and a digest, no
    other, and the data is exactly as long as they are."""
    expected = layout(model)
    for name in expected:
        if name not in table:
            layer, field = name.split("::")
            raise QexportError(f"{path}: layer {layer!r} has no {field!r} tensor (file corrupted); {FIX}")
        if name not in model.tensors:
            raise QexportError(f"{path}: tensor {name!r} has no digest in the header (file corrupted); {FIX}")
    for name in (*table, *model.tensors):
        if name not in expected:
            raise QexportError(
                f"{path}: tensor {name!r:.120} is not one of the header's layers' (file corrupted); {FIX}"
            )
    data = 0
    for name, (dtype, shape) in expected.items():
        entry = table[name]
        if (entry.dtype, tuple(entry.shape)) != (SAFETENSORS_DTYPES[dtype], shape):
            raise QexportError(f"{path}: tensor {name!r} is {entry.dtype} {entry.shape}, expected "
                               f"{SAFETENSORS_DTYPES[dtype]} {list(shape)} (file corrupted); {FIX}")  # fmt: skip
        data += np.dtype(dtype).itemsize * int(np.prod(shape, dtype=np.int64))
    if size != data_start + data:
        raise QexportError(f"{path} is truncated or corrupted: {size} bytes, its header describes "
                           f"{data_start + data}; {FIX}")  # fmt: skip


def _layer(t: dict[str, np.ndarray], name: str, channels: int) -> LayerStats:
    return LayerStats(
        channels=channels,
        minimum=t[f"{name}::min"],
        maximum=t[f"{name}::max"],
        channel_min=t[f"{name}::channel_min"],
        channel_max=t[f"{name}::channel_max"],
        absmax_sum=t[f"{name}::absmax_sum"],
        count=t[f"{name}::count"],
        asq_z=t[f"{name}::asq_z"],
        asq_n=int(t[f"{name}::asq_n"][0]),
        hist=t.get(f"{name}::hist"),
        hist_range=t.get(f"{name}::hist_range"),
    )


def merge_all(parts: list[QStats]) -> QStats:
    """Merge shards (ordered by shard index, so the running average sees sampling order).

    Raises:
        QexportError: the parts come from different models, step schedules or layer sets, or hold
            one shard twice.
    """
    if not parts:
        raise QexportError("nothing to merge")
    parts = sorted(parts, key=lambda p: (p.header.get("shard") or [0, 1])[0])
    first = parts[0].header
    for p in parts[1:]:
        for key in (*RUN_KEYS, "layers"):
            if p.header.get(key) != first.get(key):
                raise QexportError(
                    f"cannot merge: {key} differs ({first.get(key)!r:.80} vs {p.header.get(key)!r:.80}); "
                    "merge only statistics of one model and sampling setup"
                )
    held = [p.header["shard"] for p in parts if p.header.get("shard")]  # [index, ..., count]
    indices = [i for shard in held for i in shard[:-1]]
    if len({shard[-1] for shard in held}) > 1:
        raise QexportError(f"cannot merge: shards of different counts {sorted({s[-1] for s in held})}")
    if len(set(indices)) != len(indices):
        raise QexportError(f"cannot merge: shard {sorted(i for i in indices if indices.count(i) > 1)[0]} given twice")
    layers = dict(parts[0].layers)
    for p in parts[1:]:
        layers = {n: merge(layers[n], p.layers[n]) for n in layers}
    header = dict(first)
    complete = len(held) == len(parts) and sorted(indices) == list(range(held[0][-1])) if held else False
    header["shard"] = None if complete or not held else [*sorted(indices), held[0][-1]]
    header["samples"] = sum(int(p.header.get("samples", 0)) for p in parts)
    if len({p.header.get("prompts_hash") for p in parts}) > 1:
        header["prompts_hash"] = "+".join(str(p.header.get("prompts_hash")) for p in parts)
    return QStats(header=header, layers=layers)


def check_matches(stats: QStats, model_id: str, config_hash: str, source: str = "statistics") -> None:
    """Refuse statistics made on another model (or another config of it).

    Raises:
        QexportError: naming both model ids.
    """
    if stats.header.get("config_hash") != config_hash:
        raise QexportError(
            f"{source} were calibrated on model {stats.model_id!r} (config {stats.header.get('config_hash')}), "
            f"not on {model_id!r} (config {config_hash}); calibrate {model_id} first"
        )
