"""Group-wise weights (technique ``group_weights``, Q-DiT): per-group parameters and their rounding,
GPTQ on each row's own group grid, a tiny-latte build emitted as blocked DequantizeLinear that
verifies on onnxruntime, and what the runtimes cannot run refused with the measured reason."""

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper
from qexport.exporter.build import BuildConfig, build
from qexport.passes.gptq import damped, gptq_quantize
from qexport.passes.quant import Grid, dequantize, group_qparams, qparams, quantize, rows
from qexport.targets.catalog import ORT_CPU, QNN_HTP
from qexport.targets.legality import check_model
from qexport.verification import qnn_run
from qexport.verification.verify import verify

from qexport.errors import QexportError
from qexport.recipe import recipe_of

RNG = np.random.default_rng(0)
INT4 = Grid(bits=4, storage="int4", symmetric=True)


def _weight(n: int = 64, m: int = 24) -> np.ndarray:
    w = RNG.standard_normal((n, m))
    w[5] *= 20.0  # one outlier input channel
    return w


def test_groups_keep_an_outlier_input_channel_to_its_own_group():
    w = _weight()
    scale, zero = group_qparams(w, INT4, 16)
    assert scale.shape == zero.shape == (4, 24)
    q = quantize(w, rows(scale, 64), rows(zero, 64), INT4)
    error = np.abs(dequantize(q, rows(scale, 64), rows(zero, 64)) - w)
    assert np.all(error <= rows(scale, 64) / 2 * (1 + 1e-6))  # half a step of each group's own grid
    per_channel = qparams(w.min(axis=0), w.max(axis=0), INT4)[0]
    outside = np.delete(np.arange(64), np.arange(0, 16))  # rows of the groups without the outlier
    assert np.median(rows(scale, 64)[outside] / per_channel[None, :]) < 0.2  # a 20x outlier no longer sets them


def test_gptq_with_one_group_is_per_channel_gptq_and_groups_lower_the_output_error():
    w = _weight()
    x = RNG.standard_normal((256, 8)) @ RNG.standard_normal((8, 64)) + 0.1 * RNG.standard_normal((256, 64))
    h = x.T @ x
    scale, zero = qparams(w.min(axis=0), w.max(axis=0), INT4)
    one_group = gptq_quantize(w, h, scale[None, :], zero[None, :], INT4)
    np.testing.assert_array_equal(one_group, gptq_quantize(w, h, scale, zero, INT4))
    gs, gz = group_qparams(w, INT4, 16)
    rounded = gptq_quantize(w, h, gs, gz, INT4)
    nearest = quantize(w, rows(gs, 64), rows(gz, 64), INT4)
    hd = damped(h)

    def output_error(q: np.ndarray) -> float:
        e = dequantize(q, rows(gs, 64), rows(gz, 64)) - w
        return float(np.trace(e.T @ hd @ e))

    assert rounded.min() >= INT4.qmin and rounded.max() <= INT4.qmax
    assert output_error(rounded) < 0.5 * output_error(nearest)  # correlated inputs: the error is compensated


@pytest.mark.slow  # a GPTQ build with verification
def test_tiny_latte_w4_group_build_is_blocked_and_verifies(latte_stats, tmp_path):
    recipe = recipe_of("group_weights.size=64", "bits.weights=4", "granularity.time_ranges=1", "gptq=on")
    result = build(latte_stats, tmp_path / "g", BuildConfig(recipe=recipe))
    plan = result.ranges[0].plan
    model = onnx.load(str(result.folder / "range_00.onnx"))
    inits = {i.name: i for i in model.graph.initializer}
    blocked = [n for n in model.graph.node if n.op_type == "DequantizeLinear"
               and any(a.name == "block_size" for a in n.attribute)]  # fmt: skip
    assert len(blocked) == len(plan.layers)
    for node in blocked:
        attrs = {a.name: a.i for a in node.attribute}
        w, scale = inits[node.input[0]], numpy_helper.to_array(inits[node.input[1]])
        assert attrs == {"axis": 0, "block_size": 64} and w.data_type == onnx.TensorProto.INT4
        assert list(scale.shape) == [w.dims[0] // 64, w.dims[1]]
    assert check_model(model, ORT_CPU).ok
    assert result.manifest["quantization"]["group_weights"] == 64
    assert "group of 64 input channels" in result.manifest["quantization"]["weights"]
    v = verify(result.folder, result.adapter, [plan], result.manifest, ORT_CPU, "a red circle moving left")
    assert v.ok, v.to_json()
    assert len(v.models[0].emulated) == len(plan.layers)  # int4 weights: DequantizeLinear + float MatMul
    assert v.models[0].cosine_sim >= 0.9999


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        (["group_weights.size=40", "bits.weights=4"], r"does not divide the input width \d+ of .*sizes that divide"),
        (["group_weights=on", "bits.weights=8"], "does not run group-wise \\(blocked\\) int8"),
        (["group_weights=on", "bits.weights=4", "target=qnn-htp"], "qnn-htp does not run group-wise"),
    ],
)
def test_what_cannot_run_grouped_is_refused_before_any_work(latte_stats, tmp_path, settings, message):
    with pytest.raises(QexportError, match=message):
        build(latte_stats, tmp_path / "out", BuildConfig(recipe=recipe_of("granularity.time_ranges=1", *settings)))
    assert not (tmp_path / "out").exists()


def test_group_weights_do_not_combine_with_a_per_channel_clip():
    with pytest.raises(QexportError, match="does not combine"):
        recipe_of("group_weights=on", "weight_clip=on")


def _blocked_matmul(path: Path) -> Path:
    """x -> uint8 Q/DQ -> MatMul(blocked int4 DequantizeLinear) -> uint8 Q/DQ: a closed linear."""
    w = np.clip(RNG.integers(-7, 8, (64, 32)), -7, 7).astype(np.int8)
    scale = np.full((2, 32), 0.05, np.float32)
    inits = [helper.make_tensor("w", onnx.TensorProto.INT4, w.shape, w.flatten().tolist()),
             numpy_helper.from_array(scale, "ws"),
             helper.make_tensor("wz", onnx.TensorProto.INT4, scale.shape, [0] * scale.size),
             numpy_helper.from_array(np.array(0.02, np.float32), "s"),
             numpy_helper.from_array(np.array(128, np.uint8), "z")]  # fmt: skip
    nodes = [helper.make_node("QuantizeLinear", ["x", "s", "z"], ["xq"]),
             helper.make_node("DequantizeLinear", ["xq", "s", "z"], ["xd"]),
             helper.make_node("DequantizeLinear", ["w", "ws", "wz"], ["wd"], axis=0, block_size=32),
             helper.make_node("MatMul", ["xd", "wd"], ["m"]),
             helper.make_node("QuantizeLinear", ["m", "s", "z"], ["mq"]),
             helper.make_node("DequantizeLinear", ["mq", "s", "z"], ["y"])]  # fmt: skip
    x = helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 8, 64])
    y = helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, 8, 32])
    graph = helper.make_graph(nodes, "blocked", [x], [y], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)], ir_version=10)
    onnx.checker.check_model(model, full_check=True)
    onnx.save(model, path)
    return path


@pytest.mark.skipif(not qnn_run.available(), reason="onnxruntime-qnn is not installed (pip install 'qexport[qnn]')")
def test_the_htp_backend_refuses_a_blocked_weight_as_its_profile_says(tmp_path):
    assert not QNN_HTP.blocked_weights
    with pytest.raises(QexportError, match="does not run on the HTP backend with CPU fallback off"):
        qnn_run.htp_session(_blocked_matmul(tmp_path / "blocked.onnx"), QNN_HTP)
