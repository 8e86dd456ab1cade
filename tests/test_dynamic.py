"""Dynamic activations (technique ``dynamic_activations``, the seed paper's "Dynamic" baseline): the
run-time quantizer the simulation applies equals what onnxruntime computes from the emitted nodes,
tiny-latte builds per token and per tensor verify on integer kernels, and what cannot be built is
refused before any work."""

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import pytest
import torch
from onnx import numpy_helper
from qexport.exporter.build import BuildConfig, build
from qexport.exporter.simulate import dynamic_quant
from qexport.passes.quant import Grid
from qexport.passes.rangeplan import LayerPlan
from qexport.passes.techniques.dynamic import _per_token
from qexport.targets.catalog import ORT_CPU
from qexport.targets.legality import check_model
from qexport.verification.verify import verify
from sessions import cpu_session

from qexport.errors import QexportError
from qexport.recipe import recipe_of
from qexport.sweep import grid

RNG = np.random.default_rng(0)


def _plan(granularity: str, bits: int = 8) -> LayerPlan:
    grid = Grid(bits=bits, storage="uint8", symmetric=False)
    return LayerPlan(w_q=np.zeros((4, 4), np.int8), w_scale=np.ones(4, np.float32), w_zero=np.zeros(4, np.int8),
                     w_grid=Grid(bits=8, storage="int8", symmetric=True), a_scale=np.float32(1), a_zero=np.uint8(0),
                     a_grid=grid, divisor=None, dynamic=granularity)  # fmt: skip


def _session(nodes: list[gs.Node], x: gs.Variable, outputs: list[gs.Variable]):
    graph = gs.Graph(nodes=nodes, inputs=[x], outputs=outputs, opset=21, ir_version=10)  # onnxruntime reads <= 13
    model = gs.export_onnx(graph.cleanup().toposort())
    onnx.checker.check_model(model, full_check=True)
    return cpu_session(model.SerializeToString())


def _input() -> np.ndarray:
    x = RNG.standard_normal((2, 24, 48)).astype(np.float32) * np.linspace(0.1, 4.0, 48, dtype=np.float32)
    x[0, 3] = np.abs(x[0, 3])  # a token with no negative value: its zero point is 0
    x[1, 5] = 0.0  # an all-zero token: the scale floor keeps it finite
    return x


@pytest.mark.parametrize("bits", [8, 6])
def test_per_token_nodes_compute_what_the_simulation_rounds(bits):
    x = _input()
    xv = gs.Variable("x", dtype=np.float32, shape=list(x.shape))
    graph = gs.Graph(inputs=[xv], opset=21)
    codes, scale, point = _per_token(graph, xv, "t", 2**bits - 1)
    zero, level, centred = (gs.Variable(n, dtype=np.float32) for n in ("zero_f", "level_f", "centred"))
    dq = gs.Variable("dq", dtype=np.float32, shape=list(x.shape))
    codes.shape = list(x.shape)
    to_float = {"to": onnx.TensorProto.FLOAT}
    graph.nodes += [gs.Node("Cast", inputs=[point], outputs=[zero], attrs=to_float),
                    gs.Node("Cast", inputs=[codes], outputs=[level], attrs=to_float),
                    gs.Node("Sub", inputs=[level, zero], outputs=[centred]),
                    gs.Node("Mul", inputs=[centred, scale], outputs=[dq])]  # fmt: skip
    got_codes, got = _session(graph.nodes, xv, [codes, dq]).run(None, {"x": x})
    assert got_codes.dtype == np.uint8 and got_codes.max() <= 2**bits - 1
    want = dynamic_quant(torch.from_numpy(x.copy()), _plan("token", bits)).numpy()
    np.testing.assert_array_equal(got, want)
    assert np.all(got[1, 5] == 0.0)
    span = x.max(axis=-1).clip(0) - x.min(axis=-1).clip(max=0)
    error = np.abs(got - x).max(axis=-1)[span > 0] / span[span > 0]
    assert error.max() <= 0.5 / (2**bits - 1) * 1.001  # half a step of each token's own range


def test_per_tensor_simulation_is_dynamic_quantize_linear():
    x = _input()
    xv = gs.Variable("x", dtype=np.float32, shape=list(x.shape))
    dq = gs.Variable("dq", dtype=np.float32, shape=list(x.shape))
    q, s, z = (gs.Variable(n, dtype=d) for n, d in (("q", np.uint8), ("s", np.float32), ("z", np.uint8)))
    nodes = [gs.Node("DynamicQuantizeLinear", inputs=[xv], outputs=[q, s, z]),
             gs.Node("DequantizeLinear", inputs=[q, s, z], outputs=[dq])]  # fmt: skip
    got = _session(nodes, xv, [dq]).run(None, {"x": x})[0]
    want = dynamic_quant(torch.from_numpy(x.copy()), _plan("tensor")).numpy()
    np.testing.assert_allclose(got, want, rtol=0, atol=float(np.ptp(x)) / 255 * 1e-5)


@pytest.mark.slow  # two builds with verification, about a minute
@pytest.mark.parametrize(("granularity", "bits"), [("token", "4,6"), ("tensor", "8,8")])
def test_tiny_latte_dynamic_build_verifies_on_integer_kernels(latte_stats, tmp_path, granularity, bits):
    w_bits, a_bits = bits.split(",")
    recipe = recipe_of(f"dynamic_activations.granularity={granularity}", "granularity.time_ranges=1",
                       f"bits.weights={w_bits}", f"bits.activations={a_bits}")  # fmt: skip
    result = build(latte_stats, tmp_path / granularity, BuildConfig(recipe=recipe))
    plan = result.ranges[0].plan
    assert {lp.dynamic for lp in plan.layers.values()} == {granularity}
    model = onnx.load(str(result.folder / "range_00.onnx"))
    ops = [n.op_type for n in model.graph.node]
    report = check_model(model, ORT_CPU)
    assert report.ok and report.totals()["quantized"] == len(plan.layers)
    assert "QuantizeLinear" not in ops  # no static activation quantizer is left
    if granularity == "token":
        assert ops.count("MatMulInteger") == len(plan.layers)
        weights = [numpy_helper.to_array(i) for i in model.graph.initializer if i.name.endswith(":w_q")]
        assert weights and all(w.dtype == np.int8 and np.abs(w).max() <= 7 for w in weights)  # 4-bit codes, int8
    else:
        assert 0 < ops.count("DynamicQuantizeLinear") < len(plan.layers)  # one per input-sharing group
    v = verify(result.folder, result.adapter, [plan], result.manifest, ORT_CPU, "a red circle moving left")
    check = v.models[0]
    assert v.ok, v.to_json()
    assert len(check.integer) == len(plan.layers) and not check.emulated
    assert check.cosine_sim >= 0.9999
    assert result.manifest["quantization"]["dynamic_activations"] == granularity
    assert "dynamic" in result.manifest["quantization"]["activations"]


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        (["dynamic_activations=on", "bits.activations=16"], "8 or less"),
        (["dynamic_activations.granularity=tensor", "bits.activations=6"], "8-bit only"),
        (["dynamic_activations=on", "activation_observer=on"], "does not combine"),
        (["dynamic_activations=on", "smoothquant.mode=tsq", "smoothquant.alpha=layer"], "alpha=layer"),
    ],
)
def test_what_a_dynamic_recipe_cannot_express_is_refused(settings, message):
    with pytest.raises(QexportError, match=message):
        recipe_of(*settings)


def test_an_npu_target_refuses_dynamic_activations_before_any_work(latte_stats, tmp_path):
    recipe = recipe_of("dynamic_activations=on", "target=qnn-htp")
    with pytest.raises(QexportError, match=r"fixes every activation scale at build time.*target ort-cpu"):
        build(latte_stats, tmp_path / "out", BuildConfig(recipe=recipe))
    assert not (tmp_path / "out").exists()


def test_sweep_has_the_dynamic_row_and_refuses_a_cell_it_cannot_build():
    cells = grid(["Dynamic", "PTQ4DiT", "+TSQ+TSW"], ["W8A8"], None)
    assert [c.name for c in cells] == ["W8A8 Dynamic", "W8A8 PTQ4DiT", "W8A8 +TSQ+TSW"]
    with pytest.raises(QexportError, match="sweep cell W8A16 Dynamic"):
        grid(["Dynamic"], ["W8A16"], None)
