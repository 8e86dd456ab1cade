"""Twin-log weights (technique ``twin_log_weights``, LRQ-DiT): the per-channel level tables and the
nearest-level codes, a tiny-latte build whose file stores exactly the plan's codes and levels and
whose onnxruntime session folds them into float weights, and what twin-log cannot store refused."""

import numpy as np
import onnx
import pytest
from qexport.exporter.build import BuildConfig, build
from qexport.passes.techniques.twin_log import twin_log
from qexport.targets.catalog import ORT_CPU
from qexport.verification.verify import optimized_session, verify

from qexport.errors import QexportError
from qexport.recipe import recipe_of

RNG = np.random.default_rng(0)


def _decode(levels: np.ndarray, codes: np.ndarray) -> np.ndarray:
    return np.take_along_axis(levels, codes.astype(np.int64), axis=0)


@pytest.mark.parametrize("bits", [2, 3, 4, 6])
def test_levels_are_two_mirrored_grids_and_each_weight_takes_its_nearest_level_of_its_sign(bits):
    w = RNG.standard_t(4, (96, 24)) * 0.02  # W^T [in, out], long-tailed like DiT weights
    w[:, 3] = np.abs(w[:, 3])  # a column without negative weights
    w[5, 7] = 0.0
    levels, codes = twin_log(w, bits)
    k = 2**bits
    assert levels.shape == (k, 24) and levels.dtype == np.float32 and codes.dtype == np.uint8
    assert codes.max() < k and np.all(levels[0] == 0)
    decoded = _decode(levels, codes)
    assert decoded[5, 7] == 0.0
    assert np.all(np.sign(decoded) * np.sign(w) >= 0)  # a weight never changes sign
    for col in range(24):
        table = levels[:, col].astype(np.float64)
        pos, neg = table[table >= 0], table[table <= 0]  # each sign's grid, zero included
        for value, got in zip(w[:, col], decoded[:, col], strict=True):
            grid = pos if value > 0 else neg
            assert abs(got - value) <= np.abs(grid - value).min() + 1e-7 * abs(value)


def test_twin_log_halves_the_error_of_a_uniform_grid_on_long_tailed_weights():
    w = RNG.standard_t(4, (256, 64)) * 0.02
    levels, codes = twin_log(w, 4)
    scale = np.abs(w).max(axis=0) / 7  # int4 symmetric per output channel, min-max
    uniform = np.clip(np.round(w / scale), -7, 7) * scale
    assert ((_decode(levels, codes) - w) ** 2).mean() < 0.5 * ((uniform - w) ** 2).mean()


@pytest.mark.parametrize(("settings", "message"), [
    (["twin_log_weights=on", "bits.weights=1"], "bits.weights must be 2..8|bits.weights"),
    (["twin_log_weights=on", "gptq=on"], "does not combine"),
    (["twin_log_weights=on", "codebook_weights=on"], "does not combine"),
])  # fmt: skip
def test_what_twin_log_cannot_store_is_refused(settings, message):
    with pytest.raises(QexportError, match=message):
        recipe_of(*settings)


def test_tiny_latte_twin_log_file_stores_the_plans_codes_and_folds_to_float_weights(latte_stats, tmp_path):
    recipe = recipe_of("twin_log_weights=on", "bits.weights=4", "granularity.time_ranges=1")
    result = build(latte_stats, tmp_path / "tl", BuildConfig(recipe=recipe))
    plan = result.ranges[0].plan
    path = result.folder / "range_00.onnx"
    model = onnx.load(str(path))
    onnx.checker.check_model(model, full_check=True)
    inits = {t.name: t for t in model.graph.initializer}
    casts = {n.output[0]: n.input[0] for n in model.graph.node if n.op_type == "Cast"}
    gathers = [n for n in model.graph.node if n.op_type == "GatherElements"]
    assert len(gathers) == len(plan.layers)
    stored = []
    for n in gathers:  # GatherElements(levels, Cast(codes)): the file's codes UINT4, decoded as the plan's weight
        codes = inits[casts[n.input[1]]]
        assert codes.data_type == onnx.TensorProto.UINT4 and n.input[0].endswith(":levels")
        levels = onnx.numpy_helper.to_array(inits[n.input[0]])
        stored.append(_decode(levels, onnx.numpy_helper.to_array(codes)))
    for lp in plan.layers.values():
        assert lp.levels is not None and lp.levels.shape == (16, lp.shape[1])
        assert sum(w.shape == lp.shape and np.array_equal(w, lp.weight()) for w in stored) >= 1
    _, optimized = optimized_session(path)
    assert not [n for n in optimized.graph.node if n.op_type == "GatherElements"]
    assert result.manifest["quantization"]["twin_log_weights"] == {"levels": 16}


@pytest.mark.slow  # a verification on onnxruntime
def test_tiny_latte_twin_log_build_verifies(latte_stats, tmp_path):
    recipe = recipe_of("twin_log_weights=on", "bits.weights=4", "granularity.time_ranges=1")
    result = build(latte_stats, tmp_path / "tl", BuildConfig(recipe=recipe))
    plan = result.ranges[0].plan
    v = verify(result.folder, result.adapter, [plan], result.manifest, ORT_CPU, "a red circle moving left")
    assert v.ok, v.to_json()
    assert len(v.models[0].emulated) == len(plan.layers) and v.models[0].cosine_sim >= 0.9999


def test_sweep_rows_of_the_weight_formats_build_on_cw_tw():
    from qexport.sweep import cell_recipe, grid

    cells = grid(["ASQ", "Q-DiT", "VQ4DiT", "TwinLog"], ["W4A8"], None)
    kinds = [{t.kind for t in cell_recipe(c, 0.5).techniques} for c in cells]
    assert kinds == [{"smoothquant"}, {"group_weights"}, {"codebook_weights"}, {"twin_log_weights"}]
    assert all(cell_recipe(c, 0.5).granularity.time_ranges == 1 for c in cells)
    with pytest.raises(QexportError, match="sweep cell W8A8 VQ4DiT"):  # 8 bits x 2 weights: no uint8 index
        grid(["VQ4DiT"], ["W8A8"], None)


@pytest.mark.parametrize("kind", ["twin_log_weights", "codebook_weights"])
@pytest.mark.parametrize("target", ["qnn-htp", "qnn-htp-integer"])
def test_the_htp_targets_refuse_weights_decoded_from_a_lookup_before_any_work(tmp_path, kind, target):
    """Measured: on the HTP backend such a build compiles whole, but every coded linear runs as a
    float MatMul on the decoded weight, not as a quantized linear."""
    from qexport.exporter.build import check_request

    with pytest.raises(QexportError, match=f"target {target} runs a linear whose weights are codes into a lookup"):
        check_request(BuildConfig(recipe=recipe_of(f"{kind}=on", "bits.weights=4", f"target={target}")),
                      tmp_path / "out")  # fmt: skip
    assert not (tmp_path / "out").exists()
    check_request(BuildConfig(recipe=recipe_of(f"{kind}=on", "bits.weights=4")), tmp_path / "out")  # ort-cpu runs it
