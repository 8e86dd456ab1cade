"""Who holds a process's arrays: every numpy array and CPU torch tensor reachable from the
interpreter's objects and the threads' stack frames, and ONNX model / graph / tensor messages (their
serialized size) and bytes objects of 1 MiB or more, summed by what holds it (a frame's local
`function:name`, an object's attribute `Type.attr`, or the container that reached it), each buffer
counted once (views go to the array that owns the memory). Arrays whose memory is a mapped file are
summed apart: their pages can be dropped by the kernel. What the census finds against the process's
RSS is what the interpreter holds in arrays; the rest is the allocators', the libraries' (CUDA,
BLAS) and Python's own objects.

Used by bench/build_memory.py --census; on its own: `census.take()` returns a dict.
"""

from __future__ import annotations

import gc
import inspect
import mmap
import sys
import threading
import types
import warnings
from collections import Counter, deque
from typing import Any

import numpy as np

CONTAINERS = (dict, list, tuple, set, frozenset)


def _owner(array: np.ndarray) -> tuple[np.ndarray, bool]:
    """The array owning the buffer, and whether that buffer is a mapped file."""
    base: Any = array
    while isinstance(base, np.ndarray) and base.base is not None:
        if not isinstance(base.base, np.ndarray):
            return base, isinstance(base.base, mmap.mmap) or type(base.base).__name__ == "mmap"
        base = base.base
    return base, isinstance(base, np.memmap)


def _tensor_bytes(value: Any) -> tuple[int, int] | None:
    """(storage pointer, bytes) of a CPU torch tensor, or None."""
    torch = sys.modules.get("torch")
    if torch is None or not isinstance(value, torch.Tensor) or value.device.type != "cpu":
        return None
    try:
        storage = value.untyped_storage()
    except (RuntimeError, NotImplementedError):
        return None
    return storage.data_ptr(), storage.nbytes()


def _message_bytes(value: Any) -> int | None:
    """The serialized size of an ONNX model, graph or tensor message (the protobuf objects hold their
    tensors' bytes outside any array), or None."""
    if type(value).__name__ not in ("ModelProto", "GraphProto", "TensorProto"):
        return None
    try:
        return int(value.ByteSize())
    except Exception:  # not a protobuf message after all
        return None


class _Sums:
    def __init__(self) -> None:
        self.seen: set[int] = set()
        self.anonymous: Counter[str] = Counter()
        self.mapped: Counter[str] = Counter()
        self.torch: Counter[str] = Counter()
        self.other: Counter[str] = Counter()  # ONNX messages and large bytes objects

    def take(self, value: Any, label: str) -> bool:
        """Count value if it is an array, a CPU tensor, an ONNX model or graph message or a bytes
        object of 1 MiB or more; whether it was one."""
        if isinstance(value, (bytes, bytearray)) and len(value) >= 2**20:
            if id(value) not in self.seen:
                self.seen.add(id(value))
                self.other[f"{label} (bytes)"] += len(value)
            return True
        size = _message_bytes(value)
        if size is not None:
            if id(value) not in self.seen:
                self.seen.add(id(value))
                self.other[f"{label} ({type(value).__name__})"] += size
            return True
        if isinstance(value, np.ndarray):
            owner, mapped = _owner(value)
            if id(owner) not in self.seen:
                self.seen.add(id(owner))
                (self.mapped if mapped else self.anonymous)[label] += owner.nbytes
            return True
        found = _tensor_bytes(value)
        if found is not None:
            pointer, size = found
            if pointer and pointer not in self.seen:
                self.seen.add(pointer)
                self.torch[label] += size
            return True
        return False


def _walk(roots: list[tuple[Any, str]], sums: _Sums, labelled: set[int]) -> None:
    """Breadth first from (object, label) through containers, each container labelled once."""
    queue = deque(roots)
    while queue:
        value, label = queue.popleft()
        if sums.take(value, label) or not isinstance(value, CONTAINERS) or id(value) in labelled:
            continue
        labelled.add(id(value))
        try:  # the base type's own storage: a subclass's values() may compute (lazy mappings)
            base = next(kind for kind in CONTAINERS if isinstance(value, kind))
            items = list(dict.values(value) if base is dict else base.__iter__(value))
        except Exception:  # changed by another thread while listed
            continue
        queue.extend((item, label) for item in items)


def _contents(cell: Any) -> Any:
    try:
        return cell.cell_contents
    except ValueError:  # a cell not yet filled
        return None


def _attributes(value: Any) -> list[tuple[str, Any]]:
    """An object's instance attributes (its __dict__ and slots); none where reading them fails
    (proxies and mocks that raise on any attribute)."""
    try:
        found = list(vars(value).items()) if hasattr(value, "__dict__") else []
        slots = getattr(type(value), "__slots__", ())
        slots = (slots,) if isinstance(slots, str) else slots
        found += [(name, getattr(value, name)) for name in slots if hasattr(value, name)]
    except Exception:  # anything an odd __getattr__ raises: the object is skipped
        return []
    return found


def take(top: int = 25) -> dict[str, Any]:
    """The census now: totals in bytes and the `top` holders of each kind."""
    with warnings.catch_warnings():  # reading odd modules' attributes warns of deprecations
        warnings.simplefilter("ignore")
        return _take(top)


def _take(top: int) -> dict[str, Any]:
    sums, labelled = _Sums(), set()
    roots: list[tuple[Any, str]] = []
    me = threading.get_ident()  # the census's own thread: reading its running frames' locals leaks them
    for thread, frame in sys._current_frames().items():  # locals first: the most specific labels
        while frame is not None and thread != me:
            name = frame.f_code.co_name
            snapshot = frame.f_locals
            roots.extend((value, f"{name}:{var}") for var, value in list(snapshot.items()))
            if frame.f_code.co_flags & inspect.CO_OPTIMIZED:  # a function's: a copy the frame caches until
                snapshot.clear()  # its next read, which would keep dropped locals alive (a module's or
            frame = frame.f_back  # class body's is the namespace itself, never cleared)
    _walk(roots, sums, labelled)
    for obj in gc.get_objects():
        if isinstance(obj, CONTAINERS) or type(obj).__name__ in ("frame", "code", "cell"):
            continue
        if isinstance(obj, types.FunctionType):  # what a closure holds: by the function's name
            cells = zip(obj.__code__.co_freevars, obj.__closure__ or (), strict=False)
            _walk([(_contents(cell), f"{obj.__qualname__}:{name}") for name, cell in cells], sums, labelled)
            continue
        kind = type(obj).__name__
        _walk([(value, f"{kind}.{attr}") for attr, value in _attributes(obj)], sums, labelled)
    for obj in gc.get_objects():  # what only an anonymous container holds
        if isinstance(obj, CONTAINERS) and id(obj) not in labelled:
            _walk([(obj, type(obj).__name__)], sums, labelled)

    def ranked(counter: Counter[str]) -> list[tuple[str, int]]:
        return counter.most_common(top)

    return {
        "numpy_anonymous": sum(sums.anonymous.values()),
        "numpy_mapped": sum(sums.mapped.values()),
        "torch_cpu": sum(sums.torch.values()),
        "messages_and_bytes": sum(sums.other.values()),
        "anonymous_by_holder": ranked(sums.anonymous),
        "mapped_by_holder": ranked(sums.mapped),
        "torch_by_holder": ranked(sums.torch),
        "messages_and_bytes_by_holder": ranked(sums.other),
    }
