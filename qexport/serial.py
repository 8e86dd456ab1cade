"""Generic, strict conversion between frozen dataclasses and plain dicts (JSON / YAML data): one
walk over the fields' type hints, no per-field code. Unknown keys, missing required keys and
wrong types are refused with the key's dotted path. Tagged unions (lists of configs of several
classes) carry their class as ``_type``, looked up in a registry the caller passes."""

from __future__ import annotations

import dataclasses
import enum
import types
from typing import Any, Literal, Union, get_args, get_origin, get_type_hints

from qexport.errors import QexportError

TYPE_KEY = "_type"


def to_dict(obj: Any) -> Any:
    """Plain data for a dataclass tree: dicts, lists, str / int / float / bool / None; enums by
    value; a dataclass with a class-level ``kind`` gets a ``_type`` key first."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        data: dict[str, Any] = {}
        kind = getattr(type(obj), "kind", None)
        if isinstance(kind, str):
            data[TYPE_KEY] = kind
        for f in dataclasses.fields(obj):
            data[f.name] = to_dict(getattr(obj, f.name))
        return data
    if isinstance(obj, enum.Enum):
        return obj.value
    if isinstance(obj, list | tuple):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {str(k): to_dict(v) for k, v in obj.items()}
    return obj


def from_dict(cls: type, data: Any, registry: dict[str, type] | None = None, path: str = "") -> Any:
    """An instance of dataclass cls from plain data, checked strictly.

    Args:
        registry: ``_type`` name -> class, for fields typed with a tagged base class.
        path: the dotted key of data, for error messages.

    Raises:
        QexportError: an unknown or missing key, or a value of the wrong type (names the key).
    """
    return _convert(cls, data, registry or {}, path)


def _where(path: str) -> str:
    return f"recipe key {path!r}" if path else "the recipe"


def _dataclass(cls: type, data: Any, registry: dict[str, type], path: str) -> Any:
    if not isinstance(data, dict):
        raise QexportError(f"{_where(path)} must be a mapping, got {type(data).__name__} {data!r}")
    hints = get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    given = {k: v for k, v in data.items() if k != TYPE_KEY}
    unknown = sorted(set(given) - set(fields))
    if unknown:
        key = f"{path}.{unknown[0]}" if path else unknown[0]
        raise QexportError(f"unknown recipe key {key!r}; valid keys here: {', '.join(sorted(fields))}")
    values = {}
    for name, f in fields.items():
        key = f"{path}.{name}" if path else name
        if name in given:
            values[name] = _convert(hints[name], given[name], registry, key)
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise QexportError(f"recipe key {key!r} is missing")
    return cls(**values)


def _tagged(base: type, data: Any, registry: dict[str, type], path: str) -> Any:
    if not isinstance(data, dict) or TYPE_KEY not in data:
        raise QexportError(f"{_where(path)} must be a mapping with a {TYPE_KEY!r} key naming its kind")
    kind = data[TYPE_KEY]
    cls = registry.get(kind) if isinstance(kind, str) else None
    if cls is None or not issubclass(cls, base):
        raise QexportError(f"{_where(path)}: unknown {TYPE_KEY} {kind!r}; valid: {', '.join(sorted(registry))}")
    return _dataclass(cls, data, registry, path)


def _item_path(path: str, index: int, value: Any) -> str:
    """A list item's key: its kind for a tagged item (``smoothquant``), else ``path[index]``."""
    kind = value.get(TYPE_KEY) if isinstance(value, dict) else None
    return kind if isinstance(kind, str) else f"{path}[{index}]"


def _convert(hint: Any, value: Any, registry: dict[str, type], path: str) -> Any:
    origin = get_origin(hint)
    if origin in (Union, types.UnionType):
        return _union(get_args(hint), value, registry, path)
    if origin is Literal:
        if value not in get_args(hint) or isinstance(value, bool) != any(isinstance(a, bool) for a in get_args(hint)):
            choices = ", ".join(repr(a) for a in get_args(hint))
            raise QexportError(f"{_where(path)} must be one of {choices}, got {value!r}")
        return value
    if origin is dict:
        if not isinstance(value, dict):
            raise QexportError(f"{_where(path)} must be a mapping, got {type(value).__name__} {value!r}")
        key_hint, value_hint = get_args(hint)
        return {_convert(key_hint, k, registry, path): _convert(value_hint, v, registry, f"{path}.{k}")
                for k, v in value.items()}  # fmt: skip
    if origin is tuple:
        item = get_args(hint)[0]
        if not isinstance(value, list | tuple):
            raise QexportError(f"{_where(path)} must be a list, got {type(value).__name__} {value!r}")
        return tuple(_convert(item, v, registry, _item_path(path, i, v)) for i, v in enumerate(value))
    if isinstance(hint, type) and dataclasses.is_dataclass(hint):
        if any(issubclass(c, hint) and c is not hint for c in registry.values()):
            return _tagged(hint, value, registry, path)
        return _dataclass(hint, value, registry, path)
    if isinstance(hint, type) and issubclass(hint, enum.Enum):
        try:
            return hint(value)
        except ValueError:
            choices = ", ".join(repr(m.value) for m in hint)
            raise QexportError(f"{_where(path)} must be one of {choices}, got {value!r}") from None
    return _scalar(hint, value, path)


def _union(options: tuple[Any, ...], value: Any, registry: dict[str, type], path: str) -> Any:
    if value is None:
        if type(None) in options:
            return None
        raise QexportError(f"{_where(path)} must not be empty")
    for option in options:
        if option is type(None):
            continue
        try:
            return _convert(option, value, registry, path)
        except QexportError:
            continue
    kinds = " or ".join(_describe(o) for o in options if o is not type(None))
    raise QexportError(f"{_where(path)} must be {kinds}, got {value!r}")


def _describe(hint: Any) -> str:
    if get_origin(hint) is Literal:
        return "one of " + ", ".join(repr(a) for a in get_args(hint))
    return getattr(hint, "__name__", str(hint))


def _scalar(hint: Any, value: Any, path: str) -> Any:
    if hint is bool:
        ok = isinstance(value, bool)
    elif hint is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif hint is float:
        ok = isinstance(value, int | float) and not isinstance(value, bool)
        value = float(value) if ok else value
    elif hint is str:
        ok = isinstance(value, str)
    else:
        raise TypeError(f"unsupported field type {hint!r} at {path!r}")
    if not ok:
        raise QexportError(f"{_where(path)} must be {hint.__name__}, got {type(value).__name__} {value!r}")
    return value
