"""What the reference builds emit does not change when the build's design does.

tests/fixtures/regression/make_expected.py wrote expected.json from the committed 4-step
calibrations; each reference recipe is rebuilt here and compared file by file. On the machine
that wrote the fixtures every tensor is byte-identical (measured: two runs of the script gave
the same file). Elsewhere the build's float math (numpy's SIMD pow, BLAS in GPTQ and the
replayed FP passes) may differ in the last bits, so a tensor whose bytes differ is compared by
its sums: float tensors to a relative 1e-5 (float32 rounding accumulated over a sum is far
below it), integer tensors to rare ±1 rounding flips (|Δ sum| and |Δ sum |x|| at most 1e-3 of
the element count plus 2).
"""

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest

HERE = Path(__file__).parent / "fixtures" / "regression"
_spec = importlib.util.spec_from_file_location("make_expected", HERE / "make_expected.py")
assert _spec is not None and _spec.loader is not None
make_expected = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(make_expected)

EXPECTED = json.loads((HERE / "expected.json").read_text())


def _close(dtype: str, want: list, got: list, count: int) -> bool:
    if dtype.startswith(("int", "uint")):
        return abs(want[2] - got[2]) <= 1e-3 * count + 2 and abs(want[3] - got[3]) <= 1e-3 * count + 2
    return bool(np.allclose(want[2:], got[2:], rtol=1e-5, atol=1e-30))


def compare(name: str, got: dict, got_tensors: dict) -> tuple[list[str], int, int]:
    """Differences (messages) and the numbers of byte-identical and of all tensors."""
    want, tensors = EXPECTED["builds"][name], EXPECTED["tensors"]
    problems, same, total = [], 0, 0
    for key in ("quantization", "ranges", "layer_ids"):
        if got[key] != want[key]:
            problems.append(f"{name}: manifest {key} differs")
    if sorted(got["files"]) != sorted(want["files"]):
        return [*problems, f"{name}: files {sorted(got['files'])} != {sorted(want['files'])}"], 0, 0
    for file, names in want["files"].items():
        if sorted(got["files"][file]) != sorted(names):
            problems.append(f"{name}/{file}: initializer names differ")
            continue
        for tensor, key in names.items():
            total += 1
            new_key = got["files"][file][tensor]
            if new_key == key:
                same += 1
                continue
            a, b = tensors[key], got_tensors[new_key]
            if a[:2] != b[:2]:
                problems.append(f"{name}/{file}/{tensor}: {a[:2]} became {b[:2]}")
            elif not _close(a[0], a, b, int(np.prod(a[1], dtype=np.int64))):
                problems.append(f"{name}/{file}/{tensor}: sums {a[2:]} became {b[2:]}")
    return problems, same, total


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(make_expected.BUILDS))
def test_reference_build_emits_what_it_did(name, tmp_path):
    tensors: dict = {}
    got = make_expected.describe(make_expected.build_one(name, tmp_path / name), tensors)
    problems, same, total = compare(name, got, tensors)
    assert not problems, "\n".join(problems[:20]) + f"\n({same} of {total} tensors byte-identical)"
    assert total > 0
