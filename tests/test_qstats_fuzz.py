"""The .qstats file as untrusted input: every mutation of a real file (bytes damaged, header, table
or values edited, with or without resealing the digests) loads as one QexportError line, as the
original statistics, or (an edit resealed on purpose) as a valid file; the exact messages for the
cases a user meets; save refuses what load would."""

import json
import random
import struct

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from qexport.calib.stats import LayerStats
from qexport.calib.store import QStats, load, merge_all, save
from qstats_mutations import FIXTURE, MARK, MUTATORS, base_files, edit, join, put, run_case, split, tensor

from qexport.errors import QexportError

FIX = "recreate it with qexport calibrate"
LAYER = "transformer_blocks.0.attn1.to_q"


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """(folder, base files' bytes, their loaded statistics)."""
    folder = tmp_path_factory.mktemp("qstats_fuzz")
    bases = base_files(folder)
    originals = {}
    for name, blob in bases.items():
        (folder / f"{name}.qstats").write_bytes(blob)
        originals[name] = load(folder / f"{name}.qstats")
    return folder, bases, originals


def _fuzz(corpus, mutator: str, base: str, seed: int) -> None:
    folder, bases, originals = corpus
    case = run_case(folder / "case.qstats", bases, originals, mutator, base, random.Random(seed))
    assert case.kind != "other", f"{mutator} on {base}, seed {seed}: {case.detail}"
    assert case.seconds < 5, f"{mutator} on {base}, seed {seed}: {case.seconds:.1f}s"


CASES = {"mutator": st.sampled_from(sorted(MUTATORS)), "base": st.sampled_from(["tiny-dit", "small-hist"]),
         "seed": st.integers(0, 2**32 - 1)}  # fmt: skip
SETTINGS = {"deadline": None, "database": None, "derandomize": True,
            "suppress_health_check": [HealthCheck.too_slow, HealthCheck.function_scoped_fixture]}  # fmt: skip


@settings(max_examples=300, **SETTINGS)
@given(**CASES)
def test_mutated_files_are_one_clear_error_or_the_original(corpus, mutator, base, seed):
    _fuzz(corpus, mutator, base, seed)


@pytest.mark.fuzz
@settings(max_examples=10_000, **SETTINGS)
@given(**CASES)
def test_ten_thousand_mutated_files(corpus, mutator, base, seed):
    _fuzz(corpus, mutator, base, seed)


def test_every_mutator_runs_on_both_files(corpus):
    for mutator in MUTATORS:
        for base in ("tiny-dit", "small-hist"):
            for seed in range(3):
                _fuzz(corpus, mutator, base, seed)


# ---- the exact messages ---------------------------------------------------------------------------


def _write(tmp_path, blob: bytes):
    path = tmp_path / "x.qstats"
    path.write_bytes(blob)
    return path


def _message(path) -> str:
    with pytest.raises(QexportError) as err:
        load(path)
    return str(err.value)


def test_a_version_1_file_is_refused_saying_to_recalibrate(tmp_path):
    p = split(FIXTURE.read_bytes())
    header = json.loads(p.metadata["qexport"])
    header["version"] = 1
    del header["tensors"]
    p.metadata = {"qexport": json.dumps(header)}  # as version 1 wrote it: no digests
    path = _write(tmp_path, join(p))
    assert _message(path) == (
        f"{path} is a version 1 .qstats file (qexport '0.1.0'), which has no digests; this qexport reads "
        f"version 2: recalibrate with qexport calibrate -o {path}"
    )


def test_a_flipped_tensor_byte_names_the_tensor(tmp_path):
    p = split(FIXTURE.read_bytes())
    begin, _ = p.table[f"{LAYER}::max"]["data_offsets"]
    data = bytearray(p.data)
    data[begin + 1] ^= 0x10
    p.data = bytes(data)
    path = _write(tmp_path, join(p))
    assert _message(path) == f"{path}: tensor '{LAYER}::max' does not match its digest (file corrupted); {FIX}"


def test_an_edited_header_does_not_match_its_digest(tmp_path):
    path = _write(tmp_path, edit(FIXTURE.read_bytes(), random.Random(0), False, header=lambda h, _: h.update(cfg=1.0)))
    assert _message(path) == f"{path}: the qexport header does not match its digest (file corrupted); {FIX}"


def test_a_resealed_nan_names_the_layer_field_and_step(tmp_path):
    def nan(p, _):
        put(p, f"{LAYER}::min", np.array([-1, np.nan, -1, -1], dtype=np.float32))

    path = _write(tmp_path, edit(FIXTURE.read_bytes(), random.Random(0), True, data=nan))
    assert _message(path) == f"{path}: layer '{LAYER}': 'min' at step 1 is nan, not a finite number; {FIX}"


def test_a_resealed_min_above_max_is_refused(tmp_path):
    blob = FIXTURE.read_bytes()
    lo, hi = tensor(split(blob), f"{LAYER}::min"), tensor(split(blob), f"{LAYER}::max")

    def swap(p, _):
        put(p, f"{LAYER}::min", hi)
        put(p, f"{LAYER}::max", lo)

    path = _write(tmp_path, edit(blob, random.Random(0), True, data=swap))
    assert _message(path) == f"{path}: layer '{LAYER}': 'min' at step 0 is {hi[0]}, above 'max' {lo[0]}; {FIX}"


def test_a_deeply_nested_header_is_refused_before_parsing(tmp_path):
    def mark(h, _):
        h["cfg"] = MARK

    blob = edit(FIXTURE.read_bytes(), random.Random(0), True, header=mark, raw="[" * 5000 + "]" * 5000)
    path = _write(tmp_path, blob)
    assert _message(path) == (f"{path}: the qexport header is not valid JSON (nested 5001 deep, more than 24); {FIX}")


def test_an_oversize_header_length_is_refused_before_reading(tmp_path):
    blob = FIXTURE.read_bytes()
    path = _write(tmp_path, struct.pack("<Q", 1 << 40) + blob[8:])
    assert _message(path) == (
        f"{path} is not a .qstats file (its safetensors header length {1 << 40} does not fit a file of "
        f"{len(blob)} bytes); {FIX}"
    )


def test_a_resealed_wrong_type_names_the_field(tmp_path):
    def steps(h, _):
        h["steps"] = "4"

    path = _write(tmp_path, edit(FIXTURE.read_bytes(), random.Random(0), True, header=steps))
    assert _message(path) == f"{path}: header: field 'steps': input should be a valid integer, got '4'; {FIX}"


# ---- save refuses what load would; merging keeps the shard record loadable -------------------------


def test_save_refuses_statistics_load_would_refuse(tmp_path):
    stats = load(FIXTURE)
    bad = stats.layers[LAYER]
    stats.layers[LAYER] = LayerStats(**{**bad.__dict__, "maximum": np.full_like(bad.maximum, np.inf)})
    with pytest.raises(QexportError, match=rf"layer '{LAYER}': 'max' at step 0 is inf, not a finite number"):
        save(stats, tmp_path / "x.qstats")
    stats = load(FIXTURE)
    stats.header["steps"] = 0
    with pytest.raises(QexportError, match="field 'steps': input should be greater than or equal to 1"):
        save(stats, tmp_path / "x.qstats")
    assert not (tmp_path / "x.qstats").exists()


def test_merged_partial_shards_stay_loadable(corpus, tmp_path):
    _, _, originals = corpus
    small = originals["small-hist"]

    def shard(index: int, count: int) -> QStats:
        return QStats(header={**small.header, "shard": [index, count]}, layers=small.layers)

    partial = merge_all([shard(2, 3), shard(0, 3)])
    assert partial.header["shard"] == [0, 2, 3]
    save(partial, tmp_path / "partial.qstats")
    whole = merge_all([load(tmp_path / "partial.qstats"), shard(1, 3)])
    assert whole.header["shard"] is None
    with pytest.raises(QexportError, match="shard 0 given twice"):
        merge_all([partial, shard(0, 3)])
    with pytest.raises(QexportError, match="shards of different counts"):
        merge_all([partial, shard(1, 4)])
