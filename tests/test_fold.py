"""Constant folding of the exported graph: every constant-only path evaluated, in one go or one
output at a time where its constants are too large for one serialized evaluation, and a path that
cannot be evaluated an error rather than a graph left unfolded (the shape paths such a graph keeps
stop onnxruntime from fusing the linears after them into integer kernels)."""

import numpy as np
import onnx_graphsurgeon as gs
import pytest
from qexport.passes.specialise import FOLD_BYTES, fold_constants, foldable_bytes

from qexport.errors import QexportError


def _graph(values: list[np.ndarray]) -> gs.Graph:
    """y_i = x + c_i * 2 for each constant c_i: the products are constant-only paths."""
    x = gs.Variable("x", np.float32, values[0].shape)
    nodes, outputs = [], []
    for i, value in enumerate(values):
        doubled, y = gs.Variable(f"d{i}", np.float32), gs.Variable(f"y{i}", np.float32)
        two = gs.Constant(f"two{i}", np.array(2, np.float32))
        nodes += [gs.Node("Mul", inputs=[gs.Constant(f"c{i}", value), two], outputs=[doubled]),
                  gs.Node("Add", inputs=[x, doubled], outputs=[y])]  # fmt: skip
        outputs.append(y)
    return gs.Graph(nodes=nodes, inputs=[x], outputs=outputs, opset=17, ir_version=10)  # onnxruntime reads <= 13


def _folded(graph: gs.Graph) -> list[np.ndarray]:
    """The constant each Add reads, after folding; fails if anything but the Adds is left."""
    assert [n.op for n in graph.nodes] == ["Add"] * len(graph.outputs)
    return [np.asarray(n.inputs[1].values) for n in graph.nodes]


def test_a_constant_path_folds_the_same_in_one_go_and_in_pieces():
    rng = np.random.default_rng(0)
    values = [rng.standard_normal((3, 5)).astype(np.float32) for _ in range(3)]
    assert foldable_bytes(_graph(values)) == sum(v.nbytes for v in values) + 3 * 4  # the c_i and the 2s
    whole = _folded(fold_constants(_graph(values)))
    pieces = _folded(fold_constants(_graph(values), limit=0))  # over the limit: one output at a time
    for got_whole, got_pieces, value in zip(whole, pieces, values, strict=True):
        assert np.array_equal(got_whole, value * 2) and np.array_equal(got_pieces, value * 2)


def test_a_constant_path_onnxruntime_cannot_evaluate_is_an_error():
    graph = _graph([np.ones((2, 2), np.float32)])
    graph.nodes[0].op, graph.nodes[0].domain = "NoSuchOp", "org.example"
    with pytest.raises(QexportError, match="constant folding of the exported graph failed"):
        fold_constants(graph)


@pytest.mark.slow
def test_constants_past_protobufs_two_gib_fold_in_pieces():
    """Two constant paths of 1.1 GiB each: one evaluation of both cannot be serialized (protobuf's
    2 GiB), the default limit folds them one at a time (as a full-size Wan's rotary tables)."""
    values = [np.full((1, 295_000_000), i + 1, np.float32) for i in range(2)]
    assert foldable_bytes(_graph(values)) > 2**31 > FOLD_BYTES
    with pytest.raises(QexportError, match="failed: EncodeError: Failed to serialize proto"):
        fold_constants(_graph(values), limit=2**40)  # in one go
    folded = _folded(fold_constants(_graph(values)))
    assert [float(f.min()) for f in folded] == [float(f.max()) for f in folded] == [2.0, 4.0]
