"""What the reference builds emit does not change when the build's design does.

tests/fixtures/regression/make_expected.py wrote expected.json from the committed 4-step
calibrations, and recorded its environment (CPU, torch, numpy, onnxruntime). Each reference
recipe is rebuilt here and compared file by file:

- in the recorded environment, every tensor must be byte-identical and the manifest's records
  equal (measured: the builds are deterministic there, two runs of the script gave the same file);
- elsewhere the float math differs in its last bits (measured on an Intel Xeon with torch 2.11:
  per-step constants folded from the timestep cone move by ~2e-7 of their sum of |x|, SVD
  singular vectors may change sign, quantized weights flip by one level where a value sits on a
  rounding boundary). There, float tensors must agree to 1e-4 of their sum of |x| (low-rank
  factors by their sum of |x| only: a singular vector's sign is arbitrary), integer tensors may
  differ by rare ±1 flips (at most 1e-3 of the element count plus 2), manifest numbers to 1e-4;
  and a build that chooses by measuring quantized simulations (alpha or range searches, mixed
  precision, attention ranges) may choose differently, so for it only the files, tensor names and
  shapes are compared (measured there: mixed precision raised other layers, attention scales moved
  by up to 0.4 %).
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


SAME_ENVIRONMENT = EXPECTED["environment"] == make_expected.environment()
RTOL = 1e-4


def _close(name: str, dtype: str, want: list, got: list, count: int) -> bool:
    if dtype.startswith(("int", "uint")):
        return abs(want[2] - got[2]) <= 1e-3 * count + 2 and abs(want[3] - got[3]) <= 1e-3 * count + 2
    scale = RTOL * max(abs(want[3]), 1e-30)
    sign_free = "lowrank" in name  # the SVD's singular vectors are defined up to sign
    return abs(want[3] - got[3]) <= scale and (sign_free or abs(want[2] - got[2]) <= scale)


def _records_close(want: object, got: object) -> bool:
    """Manifest records equal, numbers to RTOL (ints and strings exactly)."""
    if isinstance(want, dict) and isinstance(got, dict):
        return want.keys() == got.keys() and all(_records_close(want[k], got[k]) for k in want)
    if isinstance(want, list) and isinstance(got, list):
        return len(want) == len(got) and all(_records_close(a, b) for a, b in zip(want, got, strict=True))
    if isinstance(want, float) and isinstance(got, int | float) and not isinstance(got, bool):
        return abs(want - got) <= RTOL * max(abs(want), abs(got), 1e-12)
    return want == got


def compare(name: str, got: dict, got_tensors: dict) -> tuple[list[str], int, int]:
    """Differences (messages) and the numbers of byte-identical and of all tensors."""
    want, tensors = EXPECTED["builds"][name], EXPECTED["tensors"]
    exact, choices_free = SAME_ENVIRONMENT, not SAME_ENVIRONMENT and make_expected.searches(name)
    problems, same, total = [], 0, 0
    for key in ("quantization", "ranges", "layer_ids"):
        equal = got[key] == want[key] if exact else _records_close(want[key], got[key])
        if not equal and not (choices_free and key != "layer_ids"):
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
            count = int(np.prod(a[1], dtype=np.int64))
            if a[1] != b[1] or (a[0] != b[0] and not choices_free):  # bit widths are a measured choice
                problems.append(f"{name}/{file}/{tensor}: {a[:2]} became {b[:2]}")
            elif exact or not (choices_free or _close(tensor, a[0], a, b, count)):
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
