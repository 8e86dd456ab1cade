"""The qnn-htp emission rules on tiny graphs: the layout rewrite is exact and leaves no tensor
above the rank limit and no one-input Einsum; the legality report names an open linear, a rank-6
tensor, a one-input Einsum and a signed LayerNorm scale, as the HTP backend refuses them."""

from dataclasses import replace

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import pytest
from onnx import TensorProto, helper, numpy_helper
from qexport.exporter.fp_export import stamp
from qexport.passes.layout import block_swaps, einsum_permutation, legalize_layout
from qexport.targets.catalog import get_profile
from qexport.targets.legality import check_model
from sessions import cpu_session
from test_targets import tiny_build

QNN = get_profile("qnn-htp")


def _unpatchify():
    """[n, hw, pqc] -> [n, h, w, p, q, c] -> Einsum nhwpqc->nchpwq -> [n, c, hp, wq], as diffusers writes it."""
    n, h, w, p, q, c = 2, 4, 4, 2, 2, 3
    nodes = [
        helper.make_node("Reshape", ["x", "s6"], ["x6"], name="to6"),
        helper.make_node("Einsum", ["x6"], ["y6"], equation="nhwpqc->nchpwq", name="einsum"),
        helper.make_node("Reshape", ["y6", "s4"], ["y0"], name="to4"),
        helper.make_node("Cast", ["y0"], ["y1"], to=TensorProto.FLOAT, name="noop_cast"),
        helper.make_node("Relu", ["y1"], ["y"], name="relu"),
    ]
    inits = [numpy_helper.from_array(np.array([n, h, w, p, q, c], np.int64), "s6"),
             numpy_helper.from_array(np.array([n, c, h * p, w * q], np.int64), "s4")]  # fmt: skip
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [n, h * w, p * q * c])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [n, c, h * p, w * q])
    graph = helper.make_graph(nodes, "unpatchify", [x], [y], inits)
    model = onnx.shape_inference.infer_shapes(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)]))
    stamp(model)
    return model


def _run(model, x):
    return cpu_session(model.SerializeToString()).run(None, {"x": x})[0]


@pytest.mark.parametrize("seed", range(20))
def test_block_swaps_are_any_permutation_in_rank_4_steps(seed):
    rng = np.random.default_rng(seed)
    shape = [int(d) for d in rng.integers(1, 4, 6)]
    perm = [int(a) for a in rng.permutation(6)]
    x = rng.standard_normal(shape)
    t = x
    for view, axes in block_swaps(shape, perm):
        assert len(view) == 4
        t = t.reshape(view).transpose(axes)
    assert np.array_equal(t.reshape(x.transpose(perm).shape), x.transpose(perm))
    assert einsum_permutation("nhwpqc->nchpwq") == [0, 5, 1, 3, 2, 4] and einsum_permutation("ij,jk->ik") is None


def test_unpatchify_is_rewritten_exactly_within_the_rank_limit():
    model = _unpatchify()
    rules = {v.rule for v in check_model(model, QNN, "m").violations}
    assert {"rank", "Einsum inputs"} <= rules
    fixed = gs.export_onnx(legalize_layout(gs.import_onnx(model), None, QNN).toposort())
    stamp(fixed)
    fixed = onnx.shape_inference.infer_shapes(fixed)
    assert check_model(fixed, QNN, "m").ok, [str(v) for v in check_model(fixed, QNN, "m").violations]
    ops = [n.op_type for n in fixed.graph.node]
    assert "Einsum" not in ops and "Cast" not in ops
    x = np.random.default_rng(0).standard_normal((2, 16, 12)).astype(np.float32)
    assert np.array_equal(_run(fixed, x), _run(model, x))
    # other targets are left alone
    assert gs.export_onnx(legalize_layout(gs.import_onnx(model), None, get_profile("ort-cpu"))) == gs.export_onnx(
        gs.import_onnx(model)
    )


def test_an_open_linear_is_a_violation_on_qnn_htp():
    closed, _ = tiny_build(QNN)
    assert check_model(closed, QNN, "m").ok
    open_, _ = tiny_build(replace(QNN, closed_linears=False))  # today's emission: MatMul outputs stay float
    found = [v for v in check_model(open_, QNN, "m").violations if v.rule == "closed unit"]
    assert len(found) == 3 and "one QuantizeLinear" in found[0].detail
    assert check_model(open_, get_profile("ort-cpu"), "m").ok  # a rule of qnn-htp only


def test_a_signed_layernorm_scale_is_a_violation():
    gamma = numpy_helper.from_array(np.ones(8, np.int8), "g_q")
    nodes = [
        helper.make_node("DequantizeLinear", ["g_q", "g_s", "g_z"], ["g"], name="g_dq"),
        helper.make_node("LayerNormalization", ["x", "g"], ["y"], axis=-1, name="ln"),
    ]
    inits = [
        gamma,
        numpy_helper.from_array(np.array(0.01, np.float32), "g_s"),
        numpy_helper.from_array(np.array(0, np.int8), "g_z"),
    ]
    graph = helper.make_graph(nodes, "ln", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 8])], inits)  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    found = [v for v in check_model(model, QNN, "m").violations if v.rule == "LayerNorm scale"]
    assert len(found) == 1 and found[0].node == "ln" and "int8" in found[0].detail
