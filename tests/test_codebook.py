"""Codebook weights (technique ``codebook_weights``, VQ4DiT): k-means codebooks, the decoding the
graph and the simulation share, a tiny-latte build whose onnxruntime session folds the decoding into
float weights and verifies, and what a codebook cannot store refused."""

import numpy as np
import onnx
import pytest
from qexport.exporter.build import BuildConfig, build
from qexport.passes.quant import decode_codebook
from qexport.passes.techniques.codebook import kmeans, vectors
from qexport.targets.catalog import ORT_CPU
from qexport.verification.verify import optimized_session, verify

from qexport.errors import QexportError
from qexport.recipe import recipe_of

RNG = np.random.default_rng(0)


def test_vectors_and_decoding_are_inverse():
    w = RNG.standard_normal((12, 5)).astype(np.float32)  # W^T [in, out], vectors of 3 input channels
    v = vectors(w, 3)
    assert v.shape == (20, 3)
    codes = np.arange(20, dtype=np.uint8).reshape(4, 5)  # each vector its own codeword
    np.testing.assert_array_equal(decode_codebook(v, codes), w)


def test_kmeans_finds_separated_clusters_and_assigns_each_vector_its_nearest():
    centres = np.array([[-5.0, 0.0], [5.0, 0.0], [0.0, 5.0], [0.0, -5.0]])
    v = np.repeat(centres, 50, axis=0) + 0.1 * RNG.standard_normal((200, 2))
    codebook, assign = kmeans(v, 4)
    found = codebook[np.argsort(codebook[:, 0] * 10 + codebook[:, 1])]
    np.testing.assert_allclose(found, centres[np.argsort(centres[:, 0] * 10 + centres[:, 1])], atol=0.05)
    nearest = np.argmin(((v[:, None, :] - codebook[None]) ** 2).sum(-1), axis=1)
    np.testing.assert_array_equal(assign, nearest)
    few, few_assign = kmeans(centres, 8)  # fewer distinct vectors than codewords: exact
    np.testing.assert_array_equal(few[few_assign], centres.astype(np.float32))


@pytest.mark.parametrize(("settings", "message"), [
    (["codebook_weights.dim=4", "bits.weights=4"], "bits.weights x dim must be 1..8"),
    (["codebook_weights=on", "gptq=on"], "does not combine"),
])  # fmt: skip
def test_what_a_codebook_cannot_store_is_refused(settings, message):
    with pytest.raises(QexportError, match=message):
        recipe_of(*settings)


def test_a_dim_that_does_not_divide_a_width_is_refused_naming_the_layer():
    from qexport.passes.techniques.codebook import CodebookWeights

    config = BuildConfig(recipe=recipe_of("codebook_weights.dim=4", "bits.weights=2")).quant
    CodebookWeights.check_widths(config, {"a": 192, "b": 768})
    with pytest.raises(QexportError, match="dim 4 does not divide the input width 190 of b"):
        CodebookWeights.check_widths(config, {"a": 192, "b": 190})


@pytest.mark.slow  # k-means of 64 layers and a verification
def test_tiny_latte_codebook_build_folds_to_float_weights_and_verifies(latte_stats, tmp_path):
    recipe = recipe_of("codebook_weights=on", "bits.weights=4", "granularity.time_ranges=1")
    result = build(latte_stats, tmp_path / "vq", BuildConfig(recipe=recipe))
    plan = result.ranges[0].plan
    assert all(lp.codebook is not None and lp.codebook.shape == (256, 2) for lp in plan.layers.values())
    path = result.folder / "range_00.onnx"
    model = onnx.load(str(path))
    assert sum(n.op_type == "Gather" and n.input[0].endswith(":codebook") for n in model.graph.node) == len(plan.layers)
    _, optimized = optimized_session(path)
    assert not [n for n in optimized.graph.node if n.op_type == "Gather" and n.input[0].endswith(":codebook")]
    v = verify(result.folder, result.adapter, [plan], result.manifest, ORT_CPU, "a red circle moving left")
    assert v.ok, v.to_json()
    assert len(v.models[0].emulated) == len(plan.layers) and v.models[0].cosine_sim >= 0.9999
    fp32_bytes = sum(4 * np.prod(lp.shape) for lp in plan.layers.values())
    assert sum(lp.w_q.nbytes + lp.codebook.nbytes for lp in plan.layers.values()) < 0.14 * fp32_bytes
    assert result.manifest["quantization"]["codebook_weights"] == {"dim": 2, "codewords": 256}
