"""The .qstats file: tensors in safetensors, a JSON header in its metadata; loading validates
everything and turns a truncated, corrupted or foreign file into one clear error."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from qexport.calib.stats import LayerStats, merge
from safetensors import SafetensorError
from safetensors.numpy import load_file, save_file

from qexport.errors import QexportError
from qexport.media import atomic_write

FORMAT = "qexport.qstats"
VERSION = 1
FIELDS = ("min", "max", "channel_min", "channel_max", "absmax_sum", "count", "asq_z", "asq_n")
RUN_KEYS = ("model_id", "config_hash", "steps", "timesteps", "cfg", "histograms")


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


def save(stats: QStats, path: Path) -> int:
    """Write atomically (temp file, then rename); returns the file size in bytes."""
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
        if s.hist is not None and s.hist_range is not None:
            tensors[f"{name}::hist"] = s.hist
            tensors[f"{name}::hist_range"] = s.hist_range
    path = Path(path)
    arrays = {k: np.ascontiguousarray(v) for k, v in tensors.items()}
    atomic_write(path, lambda tmp: save_file(arrays, tmp, metadata={"qexport": json.dumps(stats.header)}))
    return path.stat().st_size


def _header(path: Path) -> dict[str, Any]:
    try:
        with open(path, "rb") as f:
            size = int.from_bytes(f.read(8), "little")
            if size <= 0 or size > 100_000_000:
                raise ValueError("bad header size")
            meta = json.loads(f.read(size)).get("__metadata__", {})
        header = json.loads(meta["qexport"])
    except (ValueError, KeyError, TypeError, json.JSONDecodeError) as exc:
        raise QexportError(
            f"{path} is not a .qstats file (no qexport header: {exc}); recreate it with qexport calibrate"
        ) from exc
    if not isinstance(header, dict):
        raise QexportError(f"{path}: the qexport header is not a JSON object; recreate it with qexport calibrate")
    return header


def load(path: Path) -> QStats:
    """Read and validate a .qstats file.

    Raises:
        QexportError: missing, truncated or corrupted file, another format or version.
    """
    path = Path(path)
    if not path.is_file():
        raise QexportError(f"statistics file {path} does not exist; create it with qexport calibrate -o {path}")
    header = _header(path)
    if header.get("format") != FORMAT:
        raise QexportError(f"{path} is a {header.get('format')!r} file, not {FORMAT}")
    if header.get("version") != VERSION:
        raise QexportError(
            f"{path} has .qstats version {header.get('version')} (tool {header.get('tool_version')}); "
            f"this qexport reads version {VERSION}: recalibrate with this version"
        )
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise QexportError(f"{path} is truncated or corrupted ({exc}); recreate it with qexport calibrate") from exc
    layers = {}
    steps = int(header["steps"])
    for name, info in header["layers"].items():
        try:
            layers[name] = _layer(tensors, name, steps, int(info["in_features"]))
        except (KeyError, ValueError) as exc:
            raise QexportError(f"{path}: statistics of layer {name!r} are missing or malformed ({exc})") from exc
    return QStats(header=header, layers=layers)


def _layer(t: dict[str, np.ndarray], name: str, steps: int, channels: int) -> LayerStats:
    s = LayerStats(
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
    per_channel = (s.absmax_sum.shape, s.channel_min.shape, s.channel_max.shape)
    if s.minimum.shape != (steps,) or set(per_channel) != {(steps, channels)} or s.asq_z.shape != (channels,):
        raise ValueError(f"shapes {s.minimum.shape}, {s.absmax_sum.shape}, expected ({steps},), ({steps}, {channels})")
    return s


def merge_all(parts: list[QStats]) -> QStats:
    """Merge shards (ordered by shard index, so the running average sees sampling order).

    Raises:
        QexportError: the parts come from different models, step schedules or layer sets.
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
    shards = [tuple(p.header["shard"]) for p in parts if p.header.get("shard")]
    if len(set(shards)) != len(shards):
        raise QexportError(f"cannot merge: shard {shards} given twice")
    layers = dict(parts[0].layers)
    for p in parts[1:]:
        layers = {n: merge(layers[n], p.layers[n]) for n in layers}
    header = dict(first)
    complete = shards and len(shards) == shards[0][1] and len(parts) == len(shards)
    header["shard"] = None if complete or not shards else [s[0] for s in shards] + [shards[0][1]]
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
