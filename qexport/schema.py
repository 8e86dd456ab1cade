"""Reading untrusted JSON: bounded in size and nesting before parsing, strict (no NaN / Infinity,
no duplicate keys), then checked against a declarative pydantic model. Every failure is one
QexportError line naming the file and the field; nothing else escapes."""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path
from typing import Any, TypeVar

from pydantic import BaseModel, ConfigDict, ValidationError

from qexport.errors import QexportError

MAX_DEPTH = 24  # the deepest legitimate record (a manifest's quantization entries) is ~6
M = TypeVar("M", bound=BaseModel)


class Strict(BaseModel):
    """Base of every file schema: unknown keys refused, no coercion (a "3" is not a 3), frozen."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


class Open(BaseModel):
    """Base of a record whose extra keys are kept as written (informational entries a reader does not
    act on); the keys it declares are still checked."""

    model_config = ConfigDict(extra="allow", strict=True, frozen=True)


def nesting(text: str) -> int:
    """The deepest nesting of [ and { in JSON text (brackets inside strings ignored), in one pass."""
    depth = deepest = 0
    in_string = escaped = False
    for ch in text:
        if in_string:
            if escaped:
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == '"':
                in_string = False
        elif ch == '"':
            in_string = True
        elif ch in "[{":
            depth += 1
            deepest = max(deepest, depth)
        elif ch in "]}":
            depth -= 1
    return deepest


def _no_constants(name: str) -> Any:
    raise ValueError(f"{name} is not allowed")


def _finite(text: str) -> float:
    value = float(text)
    if value != value or value in (float("inf"), float("-inf")):
        raise ValueError(f"number {text[:20]} is out of range")
    return value


def _unique(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise ValueError(f"key {key!r} appears twice")
        out[key] = value
    return out


def parse_json(text: str | bytes, source: str, fix: str, max_depth: int = MAX_DEPTH) -> Any:
    """Parse JSON strictly: valid UTF-8, nesting at most max_depth, no NaN / Infinity, no repeated keys.

    Raises:
        QexportError: "<source> is not valid JSON (<why>); <fix>".
    """
    try:
        if isinstance(text, bytes):
            text = text.decode("utf-8")
        if (depth := nesting(text)) > max_depth:
            raise ValueError(f"nested {depth} deep, more than {max_depth}")
        return json.loads(text, parse_constant=_no_constants, parse_float=_finite, object_pairs_hook=_unique)
    except (ValueError, RecursionError) as exc:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise QexportError(f"{source} is not valid JSON ({str(exc)[:200]}); {fix}") from None


def read_json(path: Path, source: str, fix: str, max_bytes: int, max_depth: int = MAX_DEPTH) -> Any:
    """Read and parse a JSON file no larger than max_bytes (checked before reading).

    Raises:
        QexportError: missing, unreadable, too large or invalid file.
    """
    try:
        size = path.stat().st_size
        if size > max_bytes:
            raise QexportError(f"{source} is {size} bytes, more than the {max_bytes} a valid one can be; {fix}")
        with open(path, "rb") as f:
            raw = f.read(max_bytes + 1)
    except OSError as exc:
        raise QexportError(f"cannot read {source} ({exc.strerror or exc}); {fix}") from None
    return parse_json(raw, source, fix, max_depth)


def field_path(loc: tuple[int | str, ...]) -> str:
    """A pydantic error location as a dotted path: ("steps", 3, "model") -> "steps[3].model"."""
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "(top level)"


def validate(model: type[M], data: Any, source: str, fix: str) -> M:
    """data checked against model.

    Raises:
        QexportError: one line naming the first failing field, what it got and what it needs.
    """
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        err = exc.errors(include_url=False)[0]
        got = repr(err.get("input"))
        got = got if len(got) <= 60 else got[:57] + "..."
        more = f" (and {exc.error_count() - 1} more)" if exc.error_count() > 1 else ""
        raise QexportError(
            f"{source}: field {field_path(tuple(err['loc']))!r}: {err['msg'].lower()}, got {got}{more}; {fix}"
        ) from None


def plain_json(value: Any) -> Any:
    """value as the strict JSON a reader accepts: tuples as lists, numpy scalars as numbers, and a
    non-finite float (an SQNR of identical outputs, DPM-Solver's lambda_min_clipped) as the string
    "inf", "-inf" or "nan"."""
    if isinstance(value, dict):
        return {str(k): plain_json(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [plain_json(v) for v in value]
    if hasattr(value, "item") and not isinstance(value, str | bytes):
        value = value.item()  # a numpy scalar
    if isinstance(value, float) and not math.isfinite(value):
        return "nan" if value != value else ("inf" if value > 0 else "-inf")
    return value


def canonical(data: Any) -> bytes:
    """The bytes a digest of JSON data is taken over: sorted keys, no whitespace, UTF-8."""
    return json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    """The file's sha256 (hex), read in 4 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()
