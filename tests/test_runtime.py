"""The edge loop: numpy + onnxruntime only (torch made unimportable), same output as eval's path."""

import json
import subprocess
import sys

import numpy as np
import pytest
from qexport.exporter.build import BuildConfig, build

from qexport.errors import QexportError
from qexport.recipe import recipe_of
from qexport.runtime.conditioning import Conditioning
from qexport.runtime.loop import Pipeline, decode_pixels
from qexport.runtime.manifest import read_manifest

TORCH_FREE = """
import sys, numpy as np
sys.modules["torch"] = None  # any import of torch now fails
from qexport.runtime.loop import Pipeline, decode_pixels
from qexport.runtime.conditioning import Conditioning
p = Pipeline(sys.argv[1], threads=2)
c = Conditioning(sys.argv[1], p.manifest)
r = p.run(c.encode("a blue square moving up"), c.null(), 3)
np.save(sys.argv[2], decode_pixels(r.latents, p.manifest))
assert "torch" not in [m for m in sys.modules if sys.modules[m] is not None]
print(len(r.step_seconds), len(r.swap_seconds))
"""


@pytest.fixture(scope="module")
def built(latte_stats, tmp_path_factory):
    out = tmp_path_factory.mktemp("rt") / "out"
    build(latte_stats, out, BuildConfig(recipe=recipe_of("smoothquant.mode=asq", "granularity.time_ranges=2")))
    return out


def test_runtime_needs_no_torch_and_matches_the_eval_path(built, tmp_path):
    npy = tmp_path / "clip.npy"
    proc = subprocess.run([sys.executable, "-c", TORCH_FREE, str(built), str(npy)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["4", "4"]
    pipeline = Pipeline(built, threads=2)  # what qexport eval runs for a build
    cond = Conditioning(built, pipeline.manifest)
    here = decode_pixels(
        pipeline.run(cond.encode("a blue square moving up"), cond.null(), 3).latents, pipeline.manifest
    )
    there = np.load(npy)
    assert here.shape == (16, 32, 32, 3) and np.array_equal(here, there)


def test_bad_manifests_are_clear_errors(built, tmp_path):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(built, copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["schema_version"] = 99
    (copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(QexportError, match="schema 99"):
        read_manifest(copy)
    manifest["schema_version"] = 4
    (copy / "manifest.json").write_text(json.dumps(manifest))  # the manifest as built, byte for byte aside
    (copy / "range_01.onnx").unlink()
    with pytest.raises(QexportError, match=r"range_01\.onnx .* is missing"):
        read_manifest(copy)
    with pytest.raises(QexportError, match=r"no manifest\.json"):
        read_manifest(tmp_path)
    with pytest.raises(QexportError, match="unknown word 'purple'"):
        Conditioning(built, read_manifest(built)).encode("a purple circle moving left")
