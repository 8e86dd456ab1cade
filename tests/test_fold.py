"""Constant folding of the exported graph: every constant-only path evaluated, in memory or, where
its constants are too large for one serialized evaluation, from a folder with the constants as
external data; and a path that
cannot be evaluated an error rather than a graph left unfolded (the shape paths such a graph keeps
stop onnxruntime from fusing the linears after them into integer kernels)."""

import functools

import numpy as np
import onnx
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


def test_a_constant_path_folds_the_same_in_memory_and_from_a_folder():
    rng = np.random.default_rng(0)
    values = [rng.standard_normal((3, 5)).astype(np.float32) for _ in range(3)]
    assert foldable_bytes(_graph(values)) == sum(v.nbytes for v in values) + 3 * 4  # the c_i and the 2s
    whole = _folded(fold_constants(_graph(values)))
    pieces = _folded(fold_constants(_graph(values), limit=0))  # over the limit: from a folder
    for got_whole, got_pieces, value in zip(whole, pieces, values, strict=True):
        assert np.array_equal(got_whole, value * 2) and np.array_equal(got_pieces, value * 2)


def test_a_constant_path_onnxruntime_cannot_evaluate_is_an_error():
    graph = _graph([np.ones((2, 2), np.float32)])
    graph.nodes[0].op, graph.nodes[0].domain = "NoSuchOp", "org.example"
    with pytest.raises(QexportError, match="constant folding of the exported graph failed"):
        fold_constants(graph)


@pytest.mark.slow
def test_constants_past_protobufs_two_gib_fold_from_a_folder():
    """Two constant paths of 1.1 GiB each: one evaluation of both cannot be serialized (protobuf's
    2 GiB), the default limit evaluates them from a folder (as a full-size Wan's rotary tables)."""
    values = [np.full((1, 295_000_000), i + 1, np.float32) for i in range(2)]
    assert foldable_bytes(_graph(values)) > 2**31 > FOLD_BYTES
    with pytest.raises(QexportError, match="failed: EncodeError: Failed to serialize proto"):
        fold_constants(_graph(values), limit=2**40)  # in memory
    folded = _folded(fold_constants(_graph(values)))
    assert [float(f.min()) for f in folded] == [float(f.max()) for f in folded] == [2.0, 4.0]


def _assert_folds_the_same_from_a_folder(exported, monkeypatch) -> None:
    """prepare() of the export in memory and with every folding evaluation from a folder (limit 0):
    byte for byte the same model, with fewer nodes than the export."""
    from qexport.exporter import fp_export

    raw = exported.model.SerializeToString()
    want = fp_export.prepare(exported).model
    monkeypatch.setattr(fp_export, "fold_constants", functools.partial(fold_constants, limit=0))
    again = fp_export.FPExport(model=onnx.ModelProto.FromString(raw), input_names=exported.input_names,
                               bindings=exported.bindings)  # fmt: skip
    got = fp_export.prepare(again).model
    assert len(got.graph.node) == len(want.graph.node) < len(exported.model.graph.node)
    assert got.SerializeToString() == want.SerializeToString()


def test_tiny_latte_folds_to_the_same_model_from_a_folder(latte_stats, monkeypatch):
    """The whole FP export of the built-in model, prepared (shape inference and folding rounds)
    with every evaluation from a folder, is byte for byte the model prepared in memory: the
    shape folding and the values are the same."""
    from qexport.calib.store import load
    from qexport.exporter import fp_export

    from qexport.models.registry import load_model

    exported = fp_export.export_fp(load_model("tiny-latte"), list(load(latte_stats).layers))
    _assert_folds_the_same_from_a_folder(exported, monkeypatch)


def test_a_tiny_wan_pipeline_folds_to_the_same_model_from_a_folder(tmp_path, monkeypatch):
    """The same for Wan2.1's transformer (rotary tables, the graph whose full-size constants pass
    protobuf's limit), traced through its own pipeline."""
    pytest.importorskip("transformers", minversion="5", reason="the tiny pipelines need transformers>=5")
    from pipelines import FAMILIES, call_kwargs
    from qexport.calib.pipeline import PipelineCalibConfig, calibrate_pipeline
    from qexport.calib.store import save
    from qexport.exporter import fp_export
    from qexport.exporter.pipeline_build import pipeline_adapter

    folder = FAMILIES["wan2.1"](tmp_path / "src")
    own = ("prompt", "num_inference_steps", "generator", "output_type")  # set by the calibration
    call = {k: v for k, v in call_kwargs("wan2.1").items() if k not in own}
    calibrated = calibrate_pipeline(folder, PipelineCalibConfig(prompts=("a red circle",), steps=2, call=call))
    save(calibrated.stats, tmp_path / "run.qstats")
    adapter = pipeline_adapter(calibrated.stats, str(tmp_path / "run.qstats"), calibrated.stats.model_id)
    exported = fp_export.export_fp(adapter, list(calibrated.stats.layers))
    raw = exported.model.SerializeToString()
    _assert_folds_the_same_from_a_folder(exported, monkeypatch)
    # every folded value shared where equal (share 0): the blocks' rotary ScatterND indices become
    # one constant per distinct path, each ScatterND reading the same values as before
    apart = gs.import_onnx(fp_export.prepare(_again(exported, raw)).model)
    monkeypatch.setattr(fp_export, "fold_constants", functools.partial(fold_constants, limit=0, share=0))
    shared = gs.import_onnx(fp_export.prepare(_again(exported, raw)).model)
    scatters = [[n for n in g.nodes if n.op == "ScatterND"] for g in (apart, shared)]
    assert len(scatters[0]) == len(scatters[1]) >= 8  # 4 a block, 2 blocks
    for a, b in zip(*scatters, strict=True):
        assert np.array_equal(a.inputs[1].values, b.inputs[1].values)
    assert len({n.inputs[1].name for n in scatters[1]}) < len({n.inputs[1].name for n in scatters[0]})


def _again(exported, raw: bytes):
    from qexport.exporter import fp_export

    return fp_export.FPExport(model=onnx.ModelProto.FromString(raw), input_names=exported.input_names,
                              bindings=exported.bindings)  # fmt: skip


def _twice(value: np.ndarray) -> gs.Graph:
    """Two blocks that each expand the same small constant to a large table (Expand of equal
    constants, as each block of Wan's transformer builds its rotary ScatterND indices) and add it to x."""
    x = gs.Variable("x", np.float32, value.shape)
    nodes, outputs = [], []
    for i in range(2):
        table, y = gs.Variable(f"t{i}", np.float32, value.shape), gs.Variable(f"y{i}", np.float32)
        small = gs.Constant(f"row{i}", value[:1].copy())
        shape = gs.Constant(f"shape{i}", np.array(value.shape, np.int64))
        nodes += [gs.Node("Expand", inputs=[small, shape], outputs=[table]),
                  gs.Node("Add", inputs=[x, table], outputs=[y])]  # fmt: skip
        outputs.append(y)
    return gs.Graph(nodes=nodes, inputs=[x], outputs=outputs, opset=17, ir_version=10)


def test_a_large_value_two_paths_compute_alike_is_folded_once_and_shared():
    value = np.broadcast_to(np.arange(8, dtype=np.float32), (64, 8)).copy()
    apart = fold_constants(_twice(value), limit=0, share=2**40)  # from a folder, nothing shared
    shared = fold_constants(_twice(value), limit=0, share=value.nbytes)
    assert [n.op for n in shared.nodes] == [n.op for n in apart.nodes] == ["Add", "Add"]
    tables = [n.inputs[1] for n in shared.nodes]
    assert tables[0] is tables[1] and np.array_equal(tables[0].values, value)
    assert apart.nodes[0].inputs[1] is not apart.nodes[1].inputs[1]
    small = fold_constants(_twice(value), limit=0, share=value.nbytes + 1)  # under the size: apart
    assert small.nodes[0].inputs[1] is not small.nodes[1].inputs[1]


def test_values_from_unequal_constants_are_not_shared():
    value = np.broadcast_to(np.arange(8, dtype=np.float32), (64, 8)).copy()
    graph = _twice(value)
    graph.nodes[2].inputs[0].values = value[:1] + 1  # the second block's row differs
    folded = fold_constants(graph, limit=0, share=0)
    a, b = (n.inputs[1] for n in folded.nodes)
    assert a is not b and np.array_equal(a.values, value) and np.array_equal(b.values, value + 1)
