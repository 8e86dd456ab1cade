"""bench/census.py: arrays summed by holder, each buffer once, and nothing kept alive by the census."""

from __future__ import annotations

import sys
import threading
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import census


class Holder:
    def __init__(self) -> None:
        self.weights = np.zeros(3 << 20, dtype=np.uint8)  # 3 MiB
        self.view = self.weights[::2]  # the same buffer: not counted again
        self.tensor = torch.zeros(5 << 18)  # 5 MiB of float32


def _from_thread() -> dict:
    found: dict = {}
    worker = threading.Thread(target=lambda: found.update(census.take(top=1000)))
    worker.start()
    worker.join()
    return found


def test_holders_are_named_and_buffers_counted_once() -> None:
    held = Holder()
    local_array = np.ones(7 << 17)  # 7 MiB of float64, a local of this frame
    found = _from_thread()
    anonymous = dict(found["anonymous_by_holder"])
    assert anonymous["Holder.weights"] == held.weights.nbytes
    assert "Holder.view" not in anonymous
    assert anonymous["test_holders_are_named_and_buffers_counted_once:local_array"] == local_array.nbytes
    assert dict(found["torch_by_holder"])["Holder.tensor"] == held.tensor.numel() * 4
    assert found["numpy_anonymous"] >= held.weights.nbytes + local_array.nbytes


def test_the_census_keeps_nothing_alive() -> None:
    array = np.ones(16)
    before = sys.getrefcount(array)
    _from_thread()
    census.take()  # from this thread too
    assert sys.getrefcount(array) == before


def _closure() -> Callable[[], int]:
    captured = np.zeros(2 << 20, dtype=np.uint8)  # held by the returned function alone

    def reader() -> int:
        return int(captured[0])

    return reader


def test_what_a_closure_holds_is_counted() -> None:
    reader = _closure()
    found = _from_thread()
    assert reader() == 0
    assert dict(found["anonymous_by_holder"])["_closure.<locals>.reader:captured"] == 2 << 20
