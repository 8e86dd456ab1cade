"""Mutations of a .qstats file, shared by the fuzz tests (tests/test_qstats_fuzz.py) and their runner
(bench/fuzz_qstats.py): damage to the bytes, and edits of the header, the tensor table and the tensor
values, each written as it is or resealed (every digest recomputed, as someone editing the file on
purpose would). ``outcome`` says what ``load`` made of one mutated file."""

from __future__ import annotations

import json
import random
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from qexport.calib.store import DIGEST_KEY, QStats, header_digest, load, save, tensor_digest

from qexport.errors import QexportError

FIXTURE = Path(__file__).parent / "fixtures" / "regression" / "tiny-dit.qstats"
NUMPY = {"F32": np.float32, "F64": np.float64, "I64": np.int64}
MARK = "@@raw@@"  # a header value replaced by raw JSON text after serialising
Mutator = Callable[[bytes, random.Random], bytes]


# ---- the file's parts --------------------------------------------------------------------------


@dataclass
class Parts:
    """A safetensors file taken apart: tensor table, metadata (our header text and its digest), data."""

    table: dict[str, Any]
    metadata: dict[str, Any]
    data: bytes


def split(blob: bytes) -> Parts:
    n = struct.unpack("<Q", blob[:8])[0]
    outer = json.loads(blob[8 : 8 + n])
    metadata = outer.pop("__metadata__")
    return Parts(outer, metadata, blob[8 + n :])


def join(p: Parts) -> bytes:
    text = json.dumps({"__metadata__": p.metadata, **p.table}, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text + p.data


def tensor(p: Parts, name: str) -> np.ndarray | None:
    """A table entry's data, or None where the entry no longer describes a readable tensor."""
    entry = p.table.get(name)
    try:
        begin, end = entry["data_offsets"]  # type: ignore[index]
        array = np.frombuffer(p.data[begin:end], dtype=NUMPY[entry["dtype"]])  # type: ignore[index]
        return array.reshape(entry["shape"]).copy()  # type: ignore[index]
    except (KeyError, TypeError, ValueError):
        return None


def put(p: Parts, name: str, array: np.ndarray) -> None:
    """Write array's bytes over the entry's (the same size)."""
    begin, end = p.table[name]["data_offsets"]
    raw = np.ascontiguousarray(array).tobytes()
    assert len(raw) == end - begin
    p.data = p.data[:begin] + raw + p.data[end:]


def edit(blob: bytes, rng: random.Random, reseal: bool, *, table: Any = None, data: Any = None,
         header: Any = None, raw: str | None = None) -> bytes:  # fmt: skip
    """Apply the edits in file order (table, data, header dict, raw header text); resealing recomputes
    the tensors' digests before the header is edited and the header's digest last."""
    p = split(blob)
    if table:
        table(p, rng)
    if data:
        data(p, rng)
    if "qexport" not in p.metadata:  # the edit removed the header
        return join(p)
    h = json.loads(p.metadata["qexport"])
    if reseal:
        for name in p.table:
            if (array := tensor(p, name)) is not None:
                h["tensors"][name] = tensor_digest(name, array)
    if header:
        header(h, rng)
    text = json.dumps(h)
    if raw is not None:
        text = text.replace(json.dumps(MARK), raw, 1)
    p.metadata["qexport"] = text
    if reseal:
        p.metadata[DIGEST_KEY] = header_digest(text)
    return join(p)


# ---- byte damage (never resealed) ----------------------------------------------------------------


def _region(blob: bytes, rng: random.Random) -> tuple[int, int]:
    """Where to damage: the length prefix, the safetensors header, or the data, a third each."""
    n = struct.unpack("<Q", blob[:8])[0]
    return rng.choice([(0, 8), (8, 8 + n), (8 + n, len(blob))])


def bit_flips(blob: bytes, rng: random.Random) -> bytes:
    out = bytearray(blob)
    begin, end = _region(blob, rng)
    for _ in range(rng.choice([1, 1, 2, 8])):
        i = rng.randrange(begin, end)
        out[i] ^= 1 << rng.randrange(8)
    return bytes(out)


def overwrite(blob: bytes, rng: random.Random) -> bytes:
    begin, end = _region(blob, rng)
    i = rng.randrange(begin, end)
    run = rng.randbytes(rng.randint(1, 32))
    return blob[:i] + run + blob[i + len(run) :]


def truncate(blob: bytes, rng: random.Random) -> bytes:
    return blob[: rng.choice([0, 4, 8, 9, rng.randrange(len(blob)), len(blob) - 1])]


def append(blob: bytes, rng: random.Random) -> bytes:
    return blob + rng.choice([rng.randbytes(rng.randint(1, 4096)), b"\x00" * 8, blob[: rng.randint(1, 1 << 16)]])


def insert_delete(blob: bytes, rng: random.Random) -> bytes:
    begin, end = _region(blob, rng)
    i = rng.randrange(begin, end)
    if rng.random() < 0.5:
        return blob[:i] + rng.randbytes(rng.randint(1, 64)) + blob[i:]
    return blob[:i] + blob[i + rng.randint(1, 64) :]


def length_prefix(blob: bytes, rng: random.Random) -> bytes:
    n = struct.unpack("<Q", blob[:8])[0]
    value = rng.choice([0, 1, 2, n - 1, n + 1, n + 8, len(blob) - 8, len(blob), 1 << 40, (1 << 64) - 1, 33 << 20])
    return struct.pack("<Q", max(0, value)) + blob[8:]


# ---- edits of the header, the table and the values (raw or resealed) ----------------------------

WRONG = [None, True, False, "x", "", 3, -1, 0, 1.5, [], {}, [1, 2], {"a": 1}, "9" * 50, [[]]]
HUGE = [0, -1, 1, 3, 10_001, 2**31, 2**53 + 1, 2**63, 2**64, 10**30, -(10**30), 1e308, -1e308, 1e-308, 0.5, 7.000001]
NUMERIC = ["steps", "prompts", "samples", "cfg", "batch_size", "version", "hist_bins", "momentum"]
STRINGS = ["model_id", "class_name", "tool_version", "prompts_hash", "config_hash", "format", "autocast", "pipeline"]
RAW = ["[" * 30 + "]" * 30, "[" * 100_000 + "]" * 100_000, '{"a":' * 5000 + "1" + "}" * 5000, "NaN", "Infinity",
       "-Infinity", "1e999", "9" * 5000, "9" * 100_000, '1, "steps": 2', '"\\ud800"', '"\\x"', '"a\x01b"', "01",
       "[1,]", "tru", "1.", '"' + "A" * 3_000_000 + '"', "{" * 3 + "}" * 3]  # fmt: skip


def _layer(h: dict[str, Any], rng: random.Random) -> str:
    return rng.choice(sorted(h["layers"]))


def _some_path(h: dict[str, Any], rng: random.Random) -> tuple[dict[str, Any] | list[Any], Any]:
    """A random place in the header: (container, key), top level, in a layer, or in a list."""
    where = rng.random()
    if where < 0.2:
        layer = h["layers"][_layer(h, rng)]
        return layer, rng.choice(["in_features", "out_features"])
    if where < 0.3:
        key = rng.choice([k for k in ("seeds", "timesteps", "prompt_texts", "excluded", "shard") if h.get(k)])
        return h[key], rng.randrange(len(h[key]))
    if where < 0.35:
        return h["scheduler"], rng.choice(["class", "config"])
    return h, rng.choice(sorted(h))


def h_type(h: dict[str, Any], rng: random.Random) -> None:
    box, key = _some_path(h, rng)
    box[key] = rng.choice(WRONG)  # type: ignore[index]


def h_number(h: dict[str, Any], rng: random.Random) -> None:
    if rng.random() < 0.3:
        box, key = _some_path(h, rng)
    else:
        box, key = h, rng.choice(NUMERIC)
    box[key] = rng.choice(HUGE)  # type: ignore[index]


def h_string(h: dict[str, Any], rng: random.Random) -> None:
    value = rng.choice(["A" * rng.choice([201, 10_001, 1_000_000]), "\x00", "\ud800", "é", "a::b", " ", "ab\ncd"])
    target = rng.random()
    if target < 0.5:
        h[rng.choice(STRINGS)] = value
    elif target < 0.7:
        h["layers"][value] = h["layers"].pop(_layer(h, rng))
    else:
        key = rng.choice([k for k in ("prompt_texts", "excluded") if h.get(k)])
        h[key][rng.randrange(len(h[key]))] = value


def h_list(h: dict[str, Any], rng: random.Random) -> None:
    key = rng.choice(["seeds", "timesteps", "prompt_texts", "excluded", "shard"])
    n = rng.choice([0, 1, 10_001, 100_001, 300_000])
    h[key] = [rng.choice(WRONG[5:9]) if rng.random() < 0.1 else 0] * n


def h_keys(h: dict[str, Any], rng: random.Random) -> None:
    choice = rng.random()
    if choice < 0.4:
        box, key = _some_path(h, rng)
        if isinstance(box, dict):
            box.pop(key, None)
    elif choice < 0.6:
        h[f"x{rng.randrange(100)}"] = 1
    elif choice < 0.8:
        h["layers"][_layer(h, rng)]["extra"] = 1
    else:
        h["tensors"].pop(rng.choice(sorted(h["tensors"])))


def h_layers(h: dict[str, Any], rng: random.Random) -> None:
    layers, name = h["layers"], _layer(h, rng)
    choice = rng.randrange(5)
    if choice == 0:
        del layers[name]
    elif choice == 1:
        layers["blocks.99.fake"] = dict(layers[name])
    elif choice == 2:
        layers[name + "x"] = layers.pop(name)
    elif choice == 3:
        layers[name]["in_features"] += rng.choice([-1, 1, 128])
    else:
        other = _layer(h, rng)
        layers[name], layers[other] = layers[other], layers[name]


def h_version(h: dict[str, Any], rng: random.Random) -> None:
    if rng.random() < 0.7:
        h["version"] = rng.choice([1, 0, 3, "2", 2.0, None, True, -2])
    else:
        h["format"] = rng.choice(["qexport.manifest", "", None, "qexport.qstats "])


def h_raw(h: dict[str, Any], rng: random.Random) -> None:
    """Mark a place for raw text (the edit's `raw`: deep nesting, NaN, huge numbers, repeated keys...)."""
    box, key = _some_path(h, rng)
    box[key] = MARK  # type: ignore[index]


def t_entry(p: Parts, rng: random.Random) -> None:
    name = rng.choice(sorted(p.table))
    entry = p.table[name]
    choice = rng.randrange(7)
    if choice == 0:
        entry["dtype"] = rng.choice(["F16", "F32", "F64", "I64", "I32", "U8", "BOOL", "XX", 5])
    elif choice == 1:
        shape = list(entry["shape"])
        entry["shape"] = rng.choice([[*shape, 1], shape[:-1], [s + 1 for s in shape], [0], [-1], [1 << 40], "x"])
    elif choice == 2:
        begin, end = entry["data_offsets"]
        entry["data_offsets"] = rng.choice([[begin + 8, end + 8], [begin, end - 4], [end, begin], [0, end], [-1, end]])
    elif choice == 3:
        p.table[rng.choice(["evil::min", name + "x", name.replace("::", "::hist_")])] = p.table.pop(name)
    elif choice == 4:
        del p.table[name]
    elif choice == 5:
        p.metadata.pop(rng.choice([DIGEST_KEY, "qexport"]))
    else:
        p.metadata[rng.choice(["other", DIGEST_KEY])] = rng.choice(["x", "0" * 64, 1])


def t_swap(p: Parts, rng: random.Random) -> None:
    """Swap the data offsets of two tensors of one byte length (the table stays well-formed)."""
    sizes: dict[int, list[str]] = {}
    for name, entry in p.table.items():
        begin, end = entry["data_offsets"]
        sizes.setdefault(end - begin, []).append(name)
    group = rng.choice([names for names in sizes.values() if len(names) > 1])
    a, b = rng.sample(group, 2)
    p.table[a]["data_offsets"], p.table[b]["data_offsets"] = p.table[b]["data_offsets"], p.table[a]["data_offsets"]


SPECIAL_FLOATS = [np.nan, np.inf, -np.inf, 3e38, -3e38, -1.0, 0.0, -0.0, 1e-45, 2.0**-1074, 3.0]
SPECIAL_INTS = [-1, 0, 1, 2**40 + 1, 2**53 + 1, 2**62, -(2**63), 7]


def v_special(p: Parts, rng: random.Random) -> None:
    """One element (or all) of one tensor set to a special value: NaN, inf, negative, huge..."""
    name = rng.choice(sorted(p.table))
    array = tensor(p, name)
    assert array is not None
    value = rng.choice(SPECIAL_FLOATS if array.dtype.kind == "f" else SPECIAL_INTS)
    flat = array.reshape(-1)
    if rng.random() < 0.8:
        flat[rng.randrange(flat.size)] = value
    else:
        flat[:] = value
    put(p, name, array)


def v_swap(p: Parts, rng: random.Random) -> None:
    """Swap two same-shaped tensors of one layer (min and max, channel_min and channel_max, ...)."""
    layer = rng.choice(sorted({n.split("::")[0] for n in p.table}))
    a, b = rng.choice([("min", "max"), ("channel_min", "channel_max"), ("absmax_sum", "absmax_sum")])
    other = rng.choice(sorted({n.split("::")[0] for n in p.table}))
    x, y = tensor(p, f"{layer}::{a}"), tensor(p, f"{other}::{b}")
    if x is not None and y is not None and x.shape == y.shape:
        put(p, f"{layer}::{a}", y)
        put(p, f"{other}::{b}", x)


def v_scale(p: Parts, rng: random.Random) -> None:
    name = rng.choice(sorted(p.table))
    array = tensor(p, name)
    assert array is not None
    with np.errstate(all="ignore"):  # inf * 0 is NaN: one more special value
        put(p, name, (array * rng.choice([-1, 2, 0])).astype(array.dtype))


def _structural(reseal: bool) -> dict[str, Mutator]:
    tag = "+reseal" if reseal else ""

    def raw(blob: bytes, rng: random.Random) -> bytes:
        return edit(blob, rng, reseal, header=h_raw, raw=rng.choice(RAW))

    out: dict[str, Mutator] = {f"header-raw{tag}": raw}
    for name, fn in {"header-type": h_type, "header-number": h_number, "header-string": h_string,
                     "header-list": h_list, "header-keys": h_keys, "header-layers": h_layers,
                     "header-version": h_version}.items():  # fmt: skip
        out[name + tag] = lambda blob, rng, fn=fn: edit(blob, rng, reseal, header=fn)
    for name, fn in {"table-entry": t_entry, "table-swap-offsets": t_swap}.items():
        out[name + tag] = lambda blob, rng, fn=fn: edit(blob, rng, reseal, table=fn)
    for name, fn in {"values-special": v_special, "values-swap": v_swap, "values-scale": v_scale}.items():
        out[name + tag] = lambda blob, rng, fn=fn: edit(blob, rng, reseal, data=fn)
    return out


MUTATORS: dict[str, Mutator] = {
    "bit-flips": bit_flips,
    "overwrite": overwrite,
    "truncate": truncate,
    "append": append,
    "insert-delete": insert_delete,
    "length-prefix": length_prefix,
    **_structural(False),
    **_structural(True),
}


# ---- base files and outcomes ----------------------------------------------------------------------


def small_pipeline_file(path: Path) -> Path:
    """A small real .qstats: two linears hooked by the calibration Collector over random inputs,
    with histograms, a pipeline calibration's header fields, a shard, and an empty third step."""
    import torch
    from qexport.calib.collect import Collector
    from qexport.calib.run import file_header
    from torch import nn

    torch.manual_seed(0)
    layers = {"blocks.0.attn1.to_q": nn.Linear(8, 8), "blocks.0.ff.net.2": nn.Linear(16, 8)}
    collector = Collector(layers, 3, True, torch.device("cpu"))
    with torch.no_grad():
        for step in range(2):  # step 2 left empty: no sample reached it (as in a shard with no work)
            collector.step, collector.samples = step, 2
            for m in layers.values():
                m(torch.randn(2, 5, m.in_features) * (step + 1))
    call = {"step": 0, "tensors": {"hidden_states": {"shape": [2, 4, 8, 8], "dtype": "float32"}},
            "values": {"return_dict": "False"}}  # fmt: skip
    header = {
        **file_header(("a red circle", "a blue square"), layers, ["proj_out"], True),
        "model_id": "diffusers:/tmp/tiny-pixart", "class_name": "PixArtTransformer2DModel",
        "pipeline": "PixArtAlphaPipeline", "config_hash": "0123456789abcdef", "steps": 3,
        "timesteps": [999.0, 666.0, 333.0], "transformer_calls": [call], "call": {"height": 64, "mask_feature": False},
        "scheduler": {"class": "DDIMScheduler", "config": {"num_train_timesteps": 1000}, "init_noise_sigma": 1.0,
                      "steps": [{"timestep": 999.0, "x": [[0, 1.0]], "out": [[0, -0.5]], "noise": 0.0}]},
        "seeds": [0], "noise": "latents= numpy PCG64", "samples": 2, "shard": [0, 2],
    }  # fmt: skip
    save(QStats(header=header, layers=collector.close()), path)
    return path


def base_files(folder: Path) -> dict[str, bytes]:
    """The files mutated: the committed tiny-dit calibration (36 layers, 4 steps) and a small
    pipeline-style one with histograms and an empty step."""
    return {"tiny-dit": FIXTURE.read_bytes(), "small-hist": small_pipeline_file(folder / "small.qstats").read_bytes()}


def identical(a: QStats, b: QStats) -> bool:
    """Same header (as JSON text: 2 is not 2.0, key order counts) and bitwise-equal tensors."""
    if json.dumps(a.header) != json.dumps(b.header) or list(a.layers) != list(b.layers):
        return False
    fields = ("minimum", "maximum", "channel_min", "channel_max", "absmax_sum", "count", "asq_z", "hist", "hist_range")
    for name, x in a.layers.items():
        y = b.layers[name]
        if (x.channels, x.asq_n) != (y.channels, y.asq_n):
            return False
        for f in fields:
            u, v = getattr(x, f), getattr(y, f)
            if (u is None) != (v is None):
                return False
            if u is not None and (u.dtype, u.shape, u.tobytes()) != (v.dtype, v.shape, v.tobytes()):
                return False
    return True


def sound(stats: QStats) -> bool:
    """An independent look at statistics a resealed edit got accepted: finite where sampled, ordered
    extremes, counts >= 0, the documented dtypes and shapes."""
    steps = stats.steps
    for s in stats.layers.values():
        full = s.count > 0
        if s.count.dtype != np.int64 or s.count.shape != (steps,) or (s.count < 0).any() or s.asq_n < 0:
            return False
        if s.minimum.dtype != np.float32 or s.channel_max.shape != (steps, s.channels):
            return False
        arrays = (s.minimum[full], s.maximum[full], s.channel_min[full], s.channel_max[full], s.absmax_sum, s.asq_z)
        if not all(np.isfinite(a).all() for a in arrays) or (s.minimum[full] > s.maximum[full]).any():
            return False
        if s.hist is not None and ((s.hist < 0).any() or not np.isfinite(s.hist_range).all()):
            return False
    return True


def outcome(path: Path, original: QStats, resealed: bool) -> tuple[str, str]:
    """What ``load`` made of a mutated file: ("error" | "identical" | "valid" | "other", detail).

    "valid" (a changed file accepted) is allowed only for resealed edits, and only when the
    statistics pass an independent check; "other" is any other exception, a multi-line error, or
    a changed file accepted without resealing.
    """
    try:
        got = load(path)
    except QexportError as exc:
        text = str(exc)
        return ("error", text) if text and "\n" not in text else ("other", f"multi-line error: {text[:300]!r}")
    except Exception as exc:  # the point of the fuzz: anything else escaping load is a finding
        return "other", f"{type(exc).__name__}: {str(exc)[:300]}"
    if identical(got, original):
        return "identical", ""
    if resealed and sound(got):
        return "valid", ""
    return "other", "a changed file was accepted"


@dataclass
class Case:
    mutator: str
    base: str
    kind: str
    detail: str
    seconds: float


def run_case(path: Path, bases: dict[str, bytes], originals: dict[str, QStats], mutator: str, base: str,
             rng: random.Random) -> Case:  # fmt: skip
    """Mutate one base file with one mutator, write it to path and classify what load made of it."""
    blob = MUTATORS[mutator](bases[base], rng)
    path.write_bytes(blob)
    start = time.perf_counter()
    kind, detail = outcome(path, originals[base], resealed=mutator.endswith("+reseal"))
    return Case(mutator, base, kind, detail, time.perf_counter() - start)
