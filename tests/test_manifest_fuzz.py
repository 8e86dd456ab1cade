"""The build folder as untrusted input, fuzzed: every mutation of a real tiny-dit build (manifest
bytes damaged, fields edited, paths pointed out of the folder, symlinks out, files changed, model
external-data locations rewritten; written as they are or resealed on purpose) reads as one
QexportError line, as the original, or (resealed) as a build that runs; no case takes 5 s or opens
a file outside the build folder. `qexport run` on resealed cases: a picture or one error line."""

import random
import shutil

import pytest
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from manifest_mutations import MUTATORS, Opens, make_build, run_build, run_case

from qexport.cli import cli
from qexport.runtime.manifest import read_manifest


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """(work folder, the base build, its manifest, its latents, the open recorder)."""
    root = tmp_path_factory.mktemp("manifest_fuzz")
    base = make_build(root)
    opens = Opens()
    yield root, base, read_manifest(base), run_build(base), opens
    opens.close()


def _fuzz(corpus, mutator: str, seed: int) -> None:
    root, base, original, latents, opens = corpus
    case = run_case(root, base, original, latents, mutator, random.Random(seed), opens)
    assert case.kind != "other", f"{mutator}, seed {seed}: {case.detail}"
    assert case.seconds < 5, f"{mutator}, seed {seed}: {case.seconds:.1f}s"


CASES = {"mutator": st.sampled_from(sorted(MUTATORS)), "seed": st.integers(0, 2**32 - 1)}
SETTINGS = {"deadline": None, "database": None, "derandomize": True,
            "suppress_health_check": [HealthCheck.too_slow, HealthCheck.function_scoped_fixture]}  # fmt: skip


@settings(max_examples=120, **SETTINGS)
@given(**CASES)
def test_mutated_builds_are_one_clear_error_the_original_or_a_resealed_build_that_runs(corpus, mutator, seed):
    _fuzz(corpus, mutator, seed)


@pytest.mark.fuzz
@settings(max_examples=2500, **SETTINGS)
@given(**CASES)
def test_thousands_of_mutated_builds(corpus, mutator, seed):
    _fuzz(corpus, mutator, seed)


def test_every_mutator_runs(corpus):
    for mutator in MUTATORS:
        _fuzz(corpus, mutator, 0)


@pytest.mark.parametrize(("mutator", "seed"), [("nudge+reseal", 3), ("traversal+reseal", 1), ("symlink_out", 2),
                                               ("external_data+reseal", 0), ("model_swap+reseal", 5)])  # fmt: skip
def test_qexport_run_on_resealed_cases_writes_a_picture_or_one_error_line(corpus, tmp_path, mutator, seed):
    base = corpus[1]
    folder = shutil.copytree(base, tmp_path / "b")
    MUTATORS[mutator](folder, random.Random(seed))
    out = tmp_path / "x.png"
    result = CliRunner().invoke(
        cli, ["run", str(folder), "--label", "red circle", "--allow-unverified", "--threads", "1", "-o", str(out)]
    )
    if result.exit_code == 0:
        assert out.stat().st_size > 0
    else:
        error = str(result.exception)
        assert type(result.exception).__name__ == "QexportError" and error and "\n" not in error, result.output
