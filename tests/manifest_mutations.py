"""Mutations of a real build folder's manifest.json and files, shared by the fuzz tests
(tests/test_manifest_fuzz.py) and their runner (bench/fuzz_manifest.py): damaged bytes, edited
fields (wrong types, huge numbers and strings, deep nesting, '..' and absolute paths, missing and
extra keys, non-UTF-8), symlinks out of the folder, changed model files and external-data
locations; each written as it is or resealed (the digest, and where files change their records,
recomputed, as someone editing the build on purpose would). ``outcome`` says what reading and
running the mutated folder gave, and which files outside the folder were opened meanwhile."""

from __future__ import annotations

import copy
import json
import os
import random
import shutil
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from qexport.errors import QexportError
from qexport.runtime.manifest import manifest_digest, read_manifest
from qexport.schema import sha256_file

MARK = "@@raw@@"  # a value replaced by raw JSON text after serialising
REPO = Path(__file__).resolve().parents[1]
Mutator = Callable[[Path, random.Random], None]  # edits a copy of the build folder in place
Leaf = tuple[tuple[Any, ...], Any]  # (path of keys / indexes, value)


# ---- the build's files -------------------------------------------------------------------------


def copy_build(base: Path, to: Path) -> Path:
    """A private copy of the build (hard links; a mutator replaces a file before changing it)."""
    shutil.rmtree(to, ignore_errors=True)
    shutil.copytree(base, to, copy_function=os.link)
    return to


def own(path: Path) -> Path:
    """Make path a file of its own (not a hard link of the base build's) before changing it."""
    data = path.read_bytes()
    path.unlink()
    path.write_bytes(data)
    return path


def load(folder: Path) -> dict[str, Any]:
    return json.loads((folder / "manifest.json").read_text())


def save(folder: Path, data: dict[str, Any], reseal: bool, raw: str | None = None, files: bool = False) -> None:
    """Write the manifest; reseal: recompute the digest (files: and every file's record first);
    raw: the JSON text that replaces the string MARK."""
    if files:
        data["integrity"]["files"] = {
            p.relative_to(folder).as_posix(): {"bytes": p.stat().st_size, "sha256": sha256_file(p)}
            for p in sorted(folder.rglob("*"))
            if p.is_file() and p.name != "manifest.json"
        }
    if reseal:
        data["digest"] = manifest_digest(data)
    text = json.dumps(data, indent=2)
    if raw is not None:
        text = text.replace(json.dumps(MARK), raw, 1)
    path = folder / "manifest.json"
    path.unlink(missing_ok=True)  # a hard link of the base build's: never written through
    path.write_bytes(text.encode("utf-8", "surrogatepass"))


def leaves(value: Any, path: tuple[Any, ...] = ()) -> Iterator[Leaf]:
    """Every (path, value) of the JSON tree, containers included (the root last)."""
    if isinstance(value, dict):
        for k, v in value.items():
            yield from leaves(v, (*path, k))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            yield from leaves(v, (*path, i))
    yield path, value


def put(data: Any, path: tuple[Any, ...], value: Any) -> None:
    for key in path[:-1]:
        data = data[key]
    data[path[-1]] = value


def pick(data: dict[str, Any], rng: random.Random, want: Callable[[tuple[Any, ...], Any], bool]) -> tuple[Any, ...]:
    choices = [p for p, v in leaves(data) if p and p != ("digest",) and want(p, v)]
    return rng.choice(choices)


FILE_KEYS = ("model", "weights", "file", "tokenizer", "data", "denoiser")


def file_fields(data: dict[str, Any]) -> list[tuple[Any, ...]]:
    """The paths of every entry naming a file of the build (not calibration.file, a record)."""
    return [p for p, v in leaves(data) if p and p[-1] in FILE_KEYS and isinstance(v, str) and p[0] != "calibration"]


def outside_copy(folder: Path, name: str) -> Path:
    """A copy of one of the build's files outside the build folder (what a symlink out points at)."""
    target = folder.parent / f"outside-{folder.name}" / name.replace("/", "_")
    target.parent.mkdir(exist_ok=True)
    shutil.copyfile(folder / name, target)
    return target


# ---- mutators ----------------------------------------------------------------------------------


def _bit_flips(folder: Path, rng: random.Random) -> None:
    path = own(folder / "manifest.json")
    blob = bytearray(path.read_bytes())
    for _ in range(rng.randint(1, 8)):
        i = rng.randrange(len(blob))
        blob[i] ^= 1 << rng.randrange(8)
    path.write_bytes(bytes(blob))


def _truncate(folder: Path, rng: random.Random) -> None:
    path = own(folder / "manifest.json")
    blob = path.read_bytes()
    path.write_bytes(blob[: rng.randrange(len(blob))])


def _garbage(folder: Path, rng: random.Random) -> None:
    path = own(folder / "manifest.json")
    blob = path.read_bytes()
    i = rng.randrange(len(blob))
    junk = rng.choice(
        [b"\xff\xfe", b"\xc3\x28", b"\x00", bytes(rng.randrange(256) for _ in range(16)), b"\xed\xa0\x80"]
    )
    path.write_bytes(blob[:i] + junk + blob[i:])


def _reformat(folder: Path, rng: random.Random) -> None:
    """The same content written another way (indentation, key order): identical when read."""
    data = load(folder)
    keys = list(data)
    rng.shuffle(keys)
    text = json.dumps({k: data[k] for k in keys}, indent=rng.choice([None, 1, 4]), ensure_ascii=rng.random() < 0.5)
    own(folder / "manifest.json").write_text(text)


def _edit(change: Callable[[dict[str, Any], random.Random], str | None], reseal: bool) -> Mutator:
    """A field edit as a mutator: written as it is, or resealed. change returns raw JSON text for
    MARK, or None."""

    def mutate(folder: Path, rng: random.Random) -> None:
        data = load(folder)
        raw = change(data, rng)
        save(folder, data, reseal, raw)

    return mutate


_OTHER = ["x", "", 0, -1, 1.5, True, False, None, [], {}, [1, 2], {"a": 1}, "4", "../x", 2**40]


def _wrong_type(data: dict[str, Any], rng: random.Random) -> None:
    path = pick(data, rng, lambda p, v: True)
    value = rng.choice([v for v in _OTHER if type(v) is not type(_get(data, path))])
    put(data, path, value)


def _huge_number(data: dict[str, Any], rng: random.Random) -> str:
    path = pick(data, rng, lambda p, v: isinstance(v, int | float) and not isinstance(v, bool))
    put(data, path, MARK)
    return rng.choice(["1" + "0" * rng.randint(19, 5000), "-1e308", "1e999", "-0", "1e-400", "123456789012345678901",
                       str(rng.uniform(-1e12, 1e12)), str(2**63), str(-(2**63) - 1)])  # fmt: skip


def _huge_string(data: dict[str, Any], rng: random.Random) -> None:
    path = pick(data, rng, lambda p, v: isinstance(v, str))
    put(data, path, rng.choice("ab/.\u00e9\u202e") * rng.choice([257, 5000, 70_000, 2_000_000]))


def _deep(data: dict[str, Any], rng: random.Random) -> str:
    path = pick(data, rng, lambda p, v: True)
    put(data, path, MARK)
    depth = rng.choice([25, 30, 100, 5000, 200_000])
    return "[" * depth + "]" * depth if rng.random() < 0.5 else '{"a":' * depth + "1" + "}" * depth


def _traversal(data: dict[str, Any], rng: random.Random) -> None:
    fields = file_fields(data)
    name = rng.choice(["../", "../../", "a/../../", "./../", "..\\", "step_00.onnx/../../"]) + rng.choice(
        ["w.bin", "etc/passwd", "outside.onnx", "b/step_00.onnx"]
    )
    for path in rng.sample(fields, rng.randint(1, min(3, len(fields)))):
        put(data, path, name)
    if rng.random() < 0.5:  # the attacker records it too
        data["integrity"]["files"][name] = {"bytes": 1, "sha256": "0" * 64}


def _absolute(data: dict[str, Any], rng: random.Random) -> None:
    fields = file_fields(data)
    name = rng.choice(["/etc/passwd", "/dev/zero", "/proc/self/environ", "C:\\Windows\\win.ini", "//server/share/x",
                       str(REPO / "pyproject.toml")])  # fmt: skip
    for path in rng.sample(fields, rng.randint(1, min(3, len(fields)))):
        put(data, path, name)


def _missing_key(data: dict[str, Any], rng: random.Random) -> None:
    path = pick(data, rng, lambda p, v: isinstance(p[-1], str))
    parent = _get(data, path[:-1])
    del parent[path[-1]]


def _extra_key(data: dict[str, Any], rng: random.Random) -> None:
    path = pick(data, rng, lambda p, v: isinstance(v, dict)) if rng.random() < 0.8 else ()
    target = _get(data, path) if path else data
    target[rng.choice(["extra", "model", "__proto__", "index", "x" * 300])] = rng.choice(_OTHER)


def _non_utf8(data: dict[str, Any], rng: random.Random) -> str:
    path = pick(data, rng, lambda p, v: isinstance(v, str))
    put(data, path, MARK)
    return '"' + rng.choice(["\udcff", "\ud800", "\x00", "\\ud800", "\\udfff\\ud800"]) + '"'


def _raw_number(data: dict[str, Any], rng: random.Random) -> str:
    path = pick(data, rng, lambda p, v: isinstance(v, int | float) and not isinstance(v, bool))
    put(data, path, MARK)
    return rng.choice(["NaN", "Infinity", "-Infinity", "1e400", "0x10", "01", "+1", ".5"])


def _repeat_key(data: dict[str, Any], rng: random.Random) -> str:
    path = pick(data, rng, lambda p, v: isinstance(v, dict) and bool(v))
    target = _get(data, path)
    key = rng.choice(list(target))
    target[key] = MARK
    return json.dumps(rng.choice(_OTHER)) + f", {json.dumps(key)}: " + json.dumps(rng.choice(_OTHER))


def _nudge(data: dict[str, Any], rng: random.Random) -> None:
    """A plausible value changed: another number of the same type, another model of the build."""
    path = pick(data, rng, lambda p, v: isinstance(v, int | float) and not isinstance(v, bool))
    value = _get(data, path)
    if isinstance(value, int):
        put(data, path, value + rng.choice([-1, 1, 2, -value]))
    else:
        put(data, path, value * rng.choice([0.0, -1.0, 0.5, 2.0, 1e5]))


def _swap(data: dict[str, Any], rng: random.Random) -> None:
    """Two entries of the same kind swapped (models, steps, ranges)."""
    kind = rng.choice(["steps", "ranges", "scheduler"])
    items = data[kind]["steps"] if kind == "scheduler" else data[kind]
    if len(items) > 1:
        i, j = rng.sample(range(len(items)), 2)
        items[i], items[j] = items[j], items[i]


def _list_edit(data: dict[str, Any], rng: random.Random) -> None:
    path = pick(data, rng, lambda p, v: isinstance(v, list) and bool(v))
    items = _get(data, path)
    i = rng.randrange(len(items))
    if rng.random() < 0.5:
        del items[i]
    else:
        items.insert(i, copy.deepcopy(items[i]))


def _model_swap(data: dict[str, Any], rng: random.Random) -> None:
    """A step's model (and its range's) pointed at another file of the build."""
    names = sorted(data["integrity"]["files"])
    name = rng.choice(names)
    i = rng.randrange(len(data["steps"]))
    data["steps"][i]["model"] = name
    data["ranges"][data["steps"][i]["range"]]["model"] = name


def _schema_version(data: dict[str, Any], rng: random.Random) -> None:
    data["schema_version"] = rng.choice([0, 1, 2, 3, 5, 99, -4, "4", 4.0, None, True, 2**70])


def _get(data: Any, path: tuple[Any, ...]) -> Any:
    for key in path:
        data = data[key]
    return data


# ---- mutators of the files ---------------------------------------------------------------------


def _data_file(folder: Path, rng: random.Random) -> Path:
    return folder / rng.choice(sorted(load(folder)["integrity"]["files"]))


def _file_bit_flip(folder: Path, rng: random.Random) -> None:
    path = own(_data_file(folder, rng))
    blob = bytearray(path.read_bytes())
    i = rng.randrange(len(blob))
    blob[i] ^= 1 << rng.randrange(8)
    path.write_bytes(bytes(blob))


def _file_truncate(folder: Path, rng: random.Random) -> None:
    path = own(_data_file(folder, rng))
    blob = path.read_bytes()
    path.write_bytes(blob[: rng.randrange(len(blob))])


def _file_missing(folder: Path, rng: random.Random) -> None:
    _data_file(folder, rng).unlink()


def _symlink_out(folder: Path, rng: random.Random) -> None:
    """A file of the build replaced by a symlink to a copy of it outside the folder (same bytes)."""
    name = _data_file(folder, rng).relative_to(folder).as_posix()
    target = outside_copy(folder, name)
    (folder / name).unlink()
    (folder / name).symlink_to(target if rng.random() < 0.5 else os.path.relpath(target, (folder / name).parent))


def _symlink_named(folder: Path, rng: random.Random) -> None:
    """A new symlink out of the folder, named by a step and its range and recorded: resealed."""
    data = load(folder)
    model = data["steps"][0]["model"]
    target = outside_copy(folder, model)
    link = rng.choice(["evil.onnx", "sub/evil.onnx"])
    (folder / link).parent.mkdir(exist_ok=True)
    (folder / link).symlink_to(target)
    for step in data["steps"]:
        if step["model"] == model:
            step["model"] = link
    for r in data["ranges"]:
        if r["model"] == model:
            r["model"] = link
    data["integrity"]["files"][link] = {"bytes": target.stat().st_size, "sha256": sha256_file(target)}
    save(folder, data, reseal=True)


def _external_data(folder: Path, rng: random.Random) -> None:
    """A step model's external-data location rewritten to leave the folder, the build resealed
    whole (file records too): only the check of the model's own file names stops it."""
    import onnx

    data = load(folder)
    name = rng.choice(sorted({s["model"] for s in data["steps"]}))
    model = onnx.load(str(folder / name), load_external_data=False)
    weights = outside_copy(folder, data["files"]["weights"])
    location = rng.choice(["../" + weights.parent.name + "/" + weights.name, str(weights), "/etc/passwd", "link.bin"])
    if location == "link.bin":
        (folder / "link.bin").symlink_to(weights)
    tensors = [t for t in model.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL]
    for t in rng.sample(tensors, rng.randint(1, len(tensors))):
        for entry in t.external_data:
            if entry.key == "location":
                entry.value = location
    own(folder / name).write_bytes(model.SerializeToString())
    save(folder, data, reseal=True, files=True)  # link.bin recorded with its target's digest


def _file_reseal(folder: Path, rng: random.Random) -> None:
    """A file changed and the build resealed whole: a changed but consistent build."""
    _file_bit_flip(folder, rng)
    save(folder, load(folder), reseal=True, files=True)


FIELD_EDITS = {
    "wrong_type": _wrong_type,
    "huge_number": _huge_number,
    "huge_string": _huge_string,
    "deep_nesting": _deep,
    "traversal": _traversal,
    "absolute_path": _absolute,
    "missing_key": _missing_key,
    "extra_key": _extra_key,
    "non_utf8": _non_utf8,
    "raw_number": _raw_number,
    "repeated_key": _repeat_key,
    "nudge": _nudge,
    "swap": _swap,
    "list_edit": _list_edit,
    "model_swap": _model_swap,
    "schema_version": _schema_version,
}
MUTATORS: dict[str, Mutator] = {
    "bit_flips": _bit_flips,
    "truncate": _truncate,
    "garbage_bytes": _garbage,
    "reformat": _reformat,
    "file_bit_flip": _file_bit_flip,
    "file_truncate": _file_truncate,
    "file_missing": _file_missing,
    "symlink_out": _symlink_out,
    "symlink_named+reseal": _symlink_named,
    "external_data+reseal": _external_data,
    "file_changed+reseal": _file_reseal,
    **{name: _edit(change, reseal=False) for name, change in FIELD_EDITS.items()},
    **{f"{name}+reseal": _edit(change, reseal=True) for name, change in FIELD_EDITS.items()},
}


# ---- what reading and running made of it ------------------------------------------------------


class Opens:
    """Records every file Python opens (sys.addaudithook "open") and every model path onnxruntime
    is given, while active; the hook stays installed (it cannot be removed) but is idle outside."""

    def __init__(self) -> None:
        self.active = False
        self.paths: list[str] = []
        self._lock = threading.Lock()
        sys.addaudithook(self._hook)
        self._real = real = ort.InferenceSession
        record = self._record

        class Recorded(real):  # type: ignore[misc, valid-type]
            def __init__(self, path_or_bytes: Any, *args: Any, **kwargs: Any) -> None:
                if isinstance(path_or_bytes, str | os.PathLike):
                    record(os.fspath(path_or_bytes))
                super().__init__(path_or_bytes, *args, **kwargs)

        ort.InferenceSession = Recorded  # type: ignore[misc]  # the runtime looks it up at call time

    def close(self) -> None:
        """Put onnxruntime's own session class back (the audit hook stays, idle)."""
        ort.InferenceSession = self._real  # type: ignore[misc]

    def _hook(self, event: str, args: tuple[Any, ...]) -> None:
        if self.active and event == "open" and isinstance(args[0], str | bytes):
            self._record(os.fsdecode(args[0]))

    def _record(self, path: str) -> None:
        if not self.active:
            return
        with self._lock:
            self.paths.append(os.path.abspath(path))

    def outside(self, folder: Path) -> list[str]:
        """Paths opened that lie outside `folder`, not counting Python's, the repository's own
        (imports, installed packages) and the kernel's (/proc, /sys, /dev)."""
        allowed = [str(Path(folder).resolve()), sys.prefix, sys.base_prefix, sys.exec_prefix, str(REPO), "/proc/",
                   "/sys/", "/dev/null", "/dev/urandom", "/etc/localtime"]  # fmt: skip
        out = []
        for p in self.paths:
            real = os.path.realpath(p)
            if not any(real == a or real.startswith(a.rstrip("/") + "/") for a in allowed):
                out.append(p)
        return out


@dataclass
class Case:
    mutator: str
    kind: str  # "error" | "identical" | "valid" | "other"
    detail: str
    seconds: float
    outside: list[str] = field(default_factory=list)


def run_build(folder: Path, manifest: dict[str, Any] | None = None) -> np.ndarray:
    """One sample of the build (label "red circle", seed 0) through the edge loop."""
    from qexport.runtime.conditioning import Conditioning
    from qexport.runtime.loop import Pipeline

    pipeline = Pipeline(folder, threads=1, manifest=manifest)
    conditioning = Conditioning(folder, pipeline.manifest)
    return pipeline.run(conditioning.encode("red circle"), conditioning.null(), 0).latents


def outcome(folder: Path, original: dict[str, Any], latents: np.ndarray, resealed: bool) -> tuple[str, str]:
    """What reading (and, for a changed manifest that reads, one run of) the folder gave:
    ("error" | "identical" | "valid" | "other", detail). "valid" (a changed build that reads and
    runs) is allowed only for resealed mutations; "other" is any other exception, a multi-line
    error, or a changed unsealed manifest accepted."""
    try:
        got = read_manifest(folder)
        if got == original:
            return "identical", ""
        if not resealed:
            return "other", "a changed manifest was accepted without resealing"
        out = run_build(folder, got)
        return ("identical" if np.array_equal(out, latents) else "valid"), ""
    except QexportError as exc:
        text = str(exc)
        return ("error", text) if text and "\n" not in text else ("other", f"multi-line error: {text[:300]!r}")
    except Exception as exc:  # the point of the fuzz: anything else escaping is a finding
        return "other", f"{type(exc).__name__}: {str(exc)[:300]}"


def run_case(work: Path, base: Path, original: dict[str, Any], latents: np.ndarray, mutator: str,
             rng: random.Random, opens: Opens) -> Case:  # fmt: skip
    """Copy the build, mutate it with one mutator, read and run it, classify."""
    folder = copy_build(base, work / "b")
    shutil.rmtree(work / "outside-b", ignore_errors=True)
    MUTATORS[mutator](folder, rng)
    opens.paths.clear()
    opens.active = True
    start = time.perf_counter()
    try:
        kind, detail = outcome(folder, original, latents, resealed=mutator.endswith("+reseal"))
    finally:
        opens.active = False
    seconds = time.perf_counter() - start
    outside = opens.outside(folder)
    if outside:
        kind, detail = "other", f"opened outside the folder: {outside[:3]}"
    return Case(mutator, kind, detail, seconds, outside)


def make_build(root: Path) -> Path:
    """The build the mutations start from: tiny-dit, 4 steps, one model per step, W8A8 (about 4 MiB)."""
    from qexport.calib.run import CalibConfig, calibrate
    from qexport.calib.store import save as save_stats
    from qexport.exporter.build import BuildConfig, build

    from qexport.models.registry import load_model
    from qexport.models.sampler import SamplingConfig
    from qexport.recipe import recipe_of

    config = CalibConfig(prompts=("red circle",), sampling=SamplingConfig(steps=4, cfg=7.0))
    save_stats(calibrate(load_model("tiny-dit"), config).stats, root / "d.qstats")
    return build(root / "d.qstats", root / "base", BuildConfig(recipe=recipe_of())).folder
