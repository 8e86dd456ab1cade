"""Weight-only int8 storage of the layers a build keeps in float (recipe ``float_layers.weights``):
the pass on a small graph (MatMul, Gemm, Gather; what it refuses), onnxruntime folding the
storage back into float weights at load, and builds of tiny-latte whose kept layers are stored
int8, verified against a simulation that rounds the same weights."""

import json

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import onnxruntime as ort
import pytest
from onnx import numpy_helper
from qexport.exporter.build import BuildConfig, build
from qexport.exporter.fp_export import stamp
from qexport.passes.rangeplan import RangePlan
from qexport.passes.rewrite import KeptBinding, PassConfig
from qexport.passes.weight_only import MIN_ELEMENTS, quantize, rounded, store_float_weights, surviving
from qexport.targets.catalog import ORT_CPU
from qexport.verification.verify import verify
from sessions import cpu_session

from qexport.errors import QexportError
from qexport.recipe import FloatWeights, recipe_of

RNG = np.random.default_rng(0)


def _graph(shared: bool = False, small: bool = False, alpha: float = 1.0):
    """x [2, 64] -> MatMul(a: W^T [64, 48]) -> Gemm(b: W [32, 48], transB) ; ids -> Gather(c: [40, 64])."""
    x = gs.Variable("x", dtype=np.float32, shape=[2, 64])
    ids = gs.Variable("ids", dtype=np.int64, shape=[3])
    a = gs.Constant("a.w", RNG.standard_normal((64, 8 if small else 48)).astype(np.float32))
    b = gs.Constant("b.w", RNG.standard_normal((32, 8 if small else 48)).astype(np.float32))
    c = gs.Constant("c.w", RNG.standard_normal((40, 64)).astype(np.float32))
    bias = gs.Constant("b.bias", RNG.standard_normal(32).astype(np.float32))
    h = gs.Variable("h", dtype=np.float32)
    y, e = gs.Variable("y", dtype=np.float32, shape=[2, 32]), gs.Variable("e", dtype=np.float32, shape=[3, 64])
    nodes = [gs.Node("MatMul", "/a/MatMul", inputs=[x, a], outputs=[h]),
             gs.Node("Gemm", "/b/Gemm", attrs={"transB": 1, "alpha": alpha}, inputs=[h, b, bias], outputs=[y]),
             gs.Node("Gather", "/c/Gather", inputs=[c, ids], outputs=[e])]  # fmt: skip
    outputs = [y, e]
    if shared:  # a second reader of a's weight
        z = gs.Variable("z", dtype=np.float32, shape=[2, 48])
        nodes.append(gs.Node("MatMul", "/a2/MatMul", inputs=[x, a], outputs=[z]))
        outputs.append(z)
    graph = gs.Graph(nodes=nodes, inputs=[x, ids], outputs=outputs, opset=21)
    kept = {m: KeptBinding(module=m, node=n, weight=f"{m}.w") for m, n in
            (("a", "/a/MatMul"), ("b", "/b/Gemm"), ("c", "/c/Gather"))}  # fmt: skip
    return graph, kept


def _model(graph):
    model = gs.export_onnx(graph.cleanup().toposort())
    stamp(model)
    onnx.checker.check_model(model)
    return model


def test_quantize_is_symmetric_per_channel_within_half_a_step():
    w = RNG.standard_normal((64, 48)).astype(np.float32)
    w[:, 3] = 0.0
    q, s = quantize(w, 1)
    assert q.dtype == np.int8 and s.shape == (48,) and q.min() >= -127 and s[3] == 1.0
    assert np.all(np.abs(q * s - w) <= s / 2 * (1 + 1e-6))
    assert np.array_equal(rounded(w.T, 0), rounded(w, 1).T)  # one channel's rounding whatever its layout


def test_the_pass_stores_int8_and_onnxruntime_computes_the_rounded_weights(tmp_path):
    graph, kept = _graph()
    weights = {m: np.asarray(graph.tensors()[f"{m}.w"].values) for m in kept}
    bias = np.asarray(graph.tensors()["b.bias"].values)
    assert surviving(graph, kept) == ["a", "b", "c"]
    plan = RangePlan(steps=[0], weight_only=("a", "b", "c"))
    model = _model(store_float_weights(graph, PassConfig(plan=plan, groups=[], nodes={}, kept=kept), ORT_CPU))
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    assert {n for n, v in inits.items() if v.dtype == np.float32 and v.size >= MIN_ELEMENTS} == set()
    assert {n for n, v in inits.items() if v.dtype == np.int8} == {"a::fw_q", "b::fw_q", "c::fw_q"}
    x = RNG.standard_normal((2, 64)).astype(np.float32)
    ids = np.array([0, 39, 7])
    h = x.astype(np.float64) @ rounded(weights["a"], 1)
    want_y = h @ rounded(weights["b"], 0).T.astype(np.float64) + bias
    path = tmp_path / "m.onnx"
    onnx.save(model, str(path))
    options = ort.SessionOptions()
    options.optimized_model_filepath = str(tmp_path / "opt.onnx")
    y, e = cpu_session(str(path), options).run(None, {"x": x, "ids": ids})
    assert np.abs(y - want_y).max() <= 1e-5 * np.abs(want_y).max()
    assert np.array_equal(e, rounded(weights["c"], 0)[ids])  # a lookup: the rounded rows exactly
    optimized = onnx.load(str(tmp_path / "opt.onnx"))
    assert not [n.op_type for n in optimized.graph.node if n.op_type in ("Cast", "Mul")]  # folded at load


@pytest.mark.parametrize("case", ["shared", "small", "alpha"])
def test_weights_the_pass_cannot_store_exactly_stay_float(case):
    graph, kept = _graph(shared=case == "shared", small=case == "small", alpha=0.5 if case == "alpha" else 1.0)
    expected = {"shared": ["b", "c"], "small": ["c"], "alpha": ["a", "c"]}[case]
    assert surviving(graph, kept) == expected


def test_auto_picks_the_targets_storage_and_a_refused_choice_is_one_error():
    assert recipe_of().float_weights() == FloatWeights.INT8  # ort-cpu
    assert recipe_of("target=qnn-htp").float_weights() == FloatWeights.FP32
    assert recipe_of("float_layers.weights=fp32").float_weights() == FloatWeights.FP32
    with pytest.raises(QexportError, match=r"float_layers\.weights.*int8.*qnn-htp.*fp32"):
        recipe_of("target=qnn-htp", "float_layers.weights=int8")
    with pytest.raises(QexportError, match="float_layers"):
        recipe_of("float_layers.weights=int4")


def _int8_casts(folder, model_file):
    """The Cast nodes that widen an int8 initializer (a stored float-kept weight)."""
    model = onnx.load(str(folder / model_file), load_external_data=False)
    int8 = {i.name for i in model.graph.initializer if i.data_type == onnx.TensorProto.INT8}
    return [n for n in model.graph.node if n.op_type == "Cast" and n.input[0] in int8]


def test_kept_layers_of_a_one_model_build_are_int8_and_verify_exactly(latte_stats, tmp_path):
    recipe = recipe_of("granularity.time_ranges=1", "smoothquant.mode=asq")
    result = build(latte_stats, tmp_path / "int8", BuildConfig(recipe=recipe))
    fp32 = build(latte_stats, tmp_path / "fp32", BuildConfig(recipe=recipe_of("float_layers.weights=fp32",
                                                                              base=recipe)))  # fmt: skip
    plan = result.ranges[0].plan
    assert "adaln_single.linear" in plan.weight_only and "caption_projection.linear_1" in plan.weight_only
    assert fp32.ranges[0].plan.weight_only == ()
    assert len(_int8_casts(result.folder, "range_00.onnx")) == len(plan.weight_only)
    saved = result.emit.weights_bytes / fp32.emit.weights_bytes
    assert saved < 0.85  # tiny-latte keeps about 0.4 M of 4.5 M parameters in float: 4 bytes -> 1 each
    v = verify(result.folder, result.adapter, [plan], result.manifest, ORT_CPU, "a red circle moving left")
    assert v.ok, v.to_json()
    assert v.models[0].cosine_sim >= 0.99999  # onnxruntime computes what the simulation rounds
    manifest = json.loads((result.folder / "manifest.json").read_text())
    assert manifest["recipe"]["float_layers"] == {"weights": "auto"}


def test_a_per_step_build_stores_what_its_steps_still_compute(latte_stats, tmp_path):
    result = build(latte_stats, tmp_path / "tsw", BuildConfig(recipe=recipe_of("smoothquant.mode=asq")))
    for r in result.ranges:  # adaLN-single reads the timestep alone: folded into each step's constants
        assert not [m for m in r.plan.weight_only if m.startswith("adaln_single")]
        assert "caption_projection.linear_1" in r.plan.weight_only
