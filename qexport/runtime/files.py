"""The build folder's files as the edge loop opens them: a name from the manifest must stay inside
the folder (relative, no '..', no symlink out), and so must every file an ONNX model names itself
(its initializers' external data, an EPContext node's context binary), checked before onnxruntime
opens it. onnxruntime's own errors on a model or its feeds become one QexportError line."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from qexport.errors import QexportError
from qexport.runtime.schema_types import path_problem

MANIFEST = "manifest.json"
REBUILD = "rebuild the folder with qexport build"


def inside(folder: Path, name: str, source: str = MANIFEST) -> Path:
    """The resolved path of `name` after checking it is a plain relative name (manifest_schema's
    path_problem) of a regular file that resolves (symlinks followed) inside `folder`.

    Raises:
        QexportError: naming the file, `source` (who named it) and what is wrong.
    """
    shown = name if len(name) <= 80 else name[:77] + "..."
    if (why := path_problem(name)) is not None:
        raise QexportError(f"{source} names the file {shown!r}: {why}; {REBUILD}")
    root = Path(folder).resolve()
    try:
        resolved = (root / name).resolve(strict=True)
    except FileNotFoundError:
        raise QexportError(f"{name} named in {source} is missing from {folder}; {REBUILD}") from None
    except (OSError, RuntimeError) as exc:  # a symlink loop, a name the file system refuses
        raise QexportError(f"{name} named in {source} cannot be resolved in {folder} ({exc}); {REBUILD}") from None
    if not resolved.is_relative_to(root):
        raise QexportError(
            f"{name} named in {source} resolves to {resolved}, outside the build folder {root} (a symlink out "
            f"of it); a build's files must lie inside its folder"
        )
    if not resolved.is_file():
        raise QexportError(f"{name} named in {source} is not a regular file; {REBUILD}")
    return resolved


def model_path(folder: Path, name: str, source: str = MANIFEST) -> Path:
    """inside(folder, name) for a model onnxruntime will open, after checking every file the model
    names: each external-data location and each EPContext context binary (embed_mode 0) must be a
    plain relative name resolving inside `folder`, relative to the model's own folder as
    onnxruntime reads it. The model is parsed without its external data.

    Raises:
        QexportError: the model is not ONNX, or names a file outside the folder (which, and where).
    """
    path = inside(folder, name, source)
    root = Path(folder).resolve()
    for what, ref in referenced_files(path):
        if (why := path_problem(ref)) is not None:
            raise QexportError(f"{name} in {folder} names {what} {ref[:80]!r}: {why}; {REBUILD}")
        inside(root, (path.parent.relative_to(root) / ref).as_posix(), f"{name} ({what})")
    return path


def referenced_files(path: Path) -> Iterator[tuple[str, str]]:
    """(what, file) for every file an ONNX model names: external data of a tensor (initializers,
    constants, subgraphs), the context binary of an EPContext node kept outside the model."""
    import onnx  # only here: the rest of the edge loop is numpy + onnxruntime

    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # protobuf's DecodeError and friends: the file is not a model
        raise QexportError(f"{path.name} is not an ONNX model onnx can parse ({str(exc)[:160]}); {REBUILD}") from None
    for tensor in _tensors(model.graph):
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            entries = {_text(e.key): _text(e.value) for e in tensor.external_data}
            yield f"the external data of tensor {_text(tensor.name)[:80]!r}", entries.get("location", "")
    for node in _nodes(model.graph):
        if _text(node.op_type) == "EPContext":
            attrs = {_text(a.name): onnx.helper.get_attribute_value(a) for a in node.attribute}
            if attrs.get("embed_mode", 1) == 0:
                yield "the context binary", _text(attrs.get("ep_cache_context", b""))


def _text(value: Any) -> str:
    """A proto string field as text (protobuf hands back bytes for one that is not valid UTF-8)."""
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


def _nodes(graph: Any) -> Iterator[Any]:
    for node in graph.node:
        yield node
        for a in node.attribute:
            for sub in [a.g] if a.HasField("g") else list(a.graphs):
                yield from _nodes(sub)


def _tensors(graph: Any) -> Iterator[Any]:
    yield from graph.initializer
    for sparse in graph.sparse_initializer:
        yield sparse.values
        yield sparse.indices
    for node in graph.node:
        for a in node.attribute:
            yield from [a.t] if a.HasField("t") else list(a.tensors)
            for sub in [a.g] if a.HasField("g") else list(a.graphs):
                yield from _tensors(sub)


def open_session(
    path: Path, options: ort.SessionOptions | None = None, providers: Sequence[str] = ("CPUExecutionProvider",)
) -> ort.InferenceSession:
    """An onnxruntime session of a checked model path (model_path).

    Raises:
        QexportError: onnxruntime cannot load it (its first line of reason).
    """
    try:
        return ort.InferenceSession(str(path), options, providers=list(providers))
    except Exception as exc:  # onnxruntime raises its own exception types, none of them QexportError
        raise QexportError(f"onnxruntime cannot load {Path(path).name} ({_first_line(exc)}); {REBUILD}") from None


def run_session(session: ort.InferenceSession, feeds: dict[str, np.ndarray], name: str) -> list[np.ndarray]:
    """All outputs of `session` on `feeds`.

    Raises:
        QexportError: the model refuses the feeds (shapes or types the manifest promised wrongly).
    """
    try:
        return list(session.run(None, feeds))
    except Exception as exc:  # onnxruntime's InvalidArgument, Fail, ...: a model and manifest that disagree
        raise QexportError(
            f"{name} refused the inputs its manifest describes ({_first_line(exc)}); {REBUILD}"
        ) from None


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines() or [type(exc).__name__]
    return lines[0][:240]
