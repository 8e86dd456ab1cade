"""Per-step specialisation: the t-only cone evaluated per step and spliced into a copy of the
once-folded graph gives the graph that folding the whole graph with t fixed gives (the way builds
made per-step models before), node for node and bit for bit, without copying weights."""

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import onnxruntime as ort
import pytest
from onnx import numpy_helper
from qexport.exporter.build import _build_range
from qexport.exporter.fp_export import FPExport, StepGraphs, export_fp, load_graph, prepare, stamp
from qexport.exporter.shapes import infer_shapes
from qexport.passes.plan import QuantConfig, Smooth
from qexport.passes.specialise import compact_constants, copy_graph, input_cone
from qexport.targets.catalog import ORT_CPU

from qexport.errors import QexportError


def _fold_whole(model: onnx.ModelProto, timestep: int) -> gs.Graph:
    """A per-step graph as builds made it before: t an initializer, the whole graph folded."""
    model = onnx.ModelProto.FromString(model.SerializeToString())
    t = next(i for i in model.graph.input if i.name == "timestep")
    shape = [d.dim_value for d in t.type.tensor_type.shape.dim]
    model.graph.input.remove(t)
    model.graph.initializer.append(numpy_helper.from_array(np.full(shape, timestep, dtype=np.int64), "timestep"))
    graph = gs.import_onnx(infer_shapes(model))
    for _ in range(8):  # folded shape ops make more shapes known: fold until nothing more folds
        before = len(graph.nodes)
        graph = gs.import_onnx(infer_shapes(gs.export_onnx(graph.fold_constants().cleanup())))
        if len(graph.nodes) == before:
            break
    graph = compact_constants(graph.toposort())
    out = gs.export_onnx(graph)
    stamp(out)
    return gs.import_onnx(out)


def _toy() -> onnx.ModelProto:
    """out = x * (e + 1) + tile(e) + c, e = float(t)[:, None, None] * w; c [2, 4, 3] repeats rows
    and also feeds the t-only Concat, so it can shrink only once that Concat is folded away."""
    x = gs.Variable("x", np.float32, (2, 4, 3))
    t = gs.Variable("timestep", np.int64, (2,))
    c = gs.Constant("c", np.broadcast_to(np.float32([1, 2, 3]), (2, 4, 3)).copy())
    w = gs.Constant("w", np.float32([[[0.5, -1.0, 2.0]]]))
    v = {n: gs.Variable(n, np.float32, s) for n, s in [("tf", (2,)), ("tu", (2, 1, 1)), ("e", (2, 1, 3)),
         ("scale", (2, 1, 3)), ("rep", (2, 4, 3)), ("cat", (2, 5, 3)), ("sum", (2, 1, 3)), ("xs", (2, 4, 3)),
         ("y", (2, 4, 3)), ("z", (2, 4, 3)), ("out", (2, 4, 3))]}  # fmt: skip
    const = lambda name, a: gs.Constant(name, np.asarray(a))  # noqa: E731
    nodes = [
        gs.Node("Cast", "cast", {"to": onnx.TensorProto.FLOAT}, [t], [v["tf"]]),
        gs.Node("Unsqueeze", "unsq", inputs=[v["tf"], const("axes", np.int64([1, 2]))], outputs=[v["tu"]]),
        gs.Node("Mul", "emb", inputs=[v["tu"], w], outputs=[v["e"]]),
        gs.Node("Add", "plus1", inputs=[v["e"], const("one", np.float32(1))], outputs=[v["scale"]]),
        gs.Node("Tile", "tile", inputs=[v["e"], const("reps", np.int64([1, 4, 1]))], outputs=[v["rep"]]),
        gs.Node("Concat", "cat", {"axis": 1}, [v["e"], c], [v["cat"]]),
        gs.Node("ReduceSum", "sum", {"keepdims": 1}, [v["cat"], const("rax", np.int64([1]))], [v["sum"]]),
        gs.Node("Mul", "xs", inputs=[x, v["scale"]], outputs=[v["xs"]]),
        gs.Node("Add", "y", inputs=[v["xs"], v["rep"]], outputs=[v["y"]]),
        gs.Node("Mul", "z", inputs=[v["y"], v["sum"]], outputs=[v["z"]]),
        gs.Node("Add", "out", inputs=[v["z"], c], outputs=[v["out"]]),
    ]
    model = gs.export_onnx(gs.Graph(nodes=nodes, inputs=[x, t], outputs=[v["out"]], opset=21))
    stamp(model)
    return model


def _signature(graph: gs.Graph) -> list[tuple]:
    return [(n.op, n.name, [t.name for t in n.inputs], [t.name for t in n.outputs]) for n in graph.nodes]


def _constants(graph: gs.Graph) -> dict[str, np.ndarray]:
    return {k: np.asarray(t.values) for k, t in graph.tensors().items() if isinstance(t, gs.Constant)}


def _assert_same_graph(got: gs.Graph, want: gs.Graph) -> None:
    assert _signature(got) == _signature(want)
    got_c, want_c = _constants(got), _constants(want)
    assert got_c.keys() == want_c.keys()
    for name, value in want_c.items():
        assert got_c[name].dtype == value.dtype and got_c[name].shape == value.shape, name
        assert np.array_equal(got_c[name], value), name  # bit for bit, not close
    shapes = lambda g: {k: t.shape for k, t in g.tensors().items() if isinstance(t, gs.Variable)}  # noqa: E731
    assert shapes(got) == shapes(want)


def test_the_cone_is_the_t_only_part_and_its_frontier():
    base = load_graph(prepare(FPExport(model=_toy(), input_names=["x", "timestep"], bindings={})))
    cone = input_cone(base, "timestep")
    assert {n.name for n in cone.nodes} == {"cast", "unsq", "emb", "plus1", "tile", "cat", "sum"}
    assert [t.name for t in cone.outputs] == ["scale", "rep", "sum"]  # not e: only cone nodes read it
    assert np.asarray(base.tensors()["c"].values).shape == (2, 4, 3)  # the Concat keeps it full
    with pytest.raises(KeyError):
        input_cone(base, "x2")


def test_toy_step_graph_equals_the_whole_graph_fold_and_shares_weights():
    model = _toy()
    base = load_graph(prepare(FPExport(model=onnx.ModelProto.FromString(model.SerializeToString()),
                                       input_names=["x", "timestep"], bindings={})))  # fmt: skip
    steps = StepGraphs(base)
    x = np.random.default_rng(0).standard_normal((2, 4, 3)).astype(np.float32)
    run = lambda g: ort.InferenceSession(gs.export_onnx(g).SerializeToString()).run(None, {"x": x})[0]  # noqa: E731
    for timestep in (999, 3):
        got, want = steps.at(timestep), _fold_whole(model, timestep)
        _assert_same_graph(got, want)
        assert [t.name for t in got.inputs] == ["x"] and "w" not in got.tensors()  # the cone is gone
        assert got.tensors()["c"].values.shape == (1, 1, 3)  # its t-only reader gone: compacted again
        assert got.tensors()["rep"].values.shape == (1, 1, 3)  # spliced in, then compacted (t is [t, t])
        assert np.array_equal(run(got), run(want))
    assert base.tensors()["c"].values.shape == (2, 4, 3) and "timestep" in [t.name for t in base.inputs]
    with pytest.raises(QexportError, match="no input 'step'"):
        StepGraphs(base, "step")


def test_copies_share_the_constant_arrays_which_are_read_only():
    base = load_graph(prepare(FPExport(model=_toy(), input_names=["x", "timestep"], bindings={})))
    copy = copy_graph(base)
    assert copy.tensors()["c"].values is base.tensors()["c"].values
    with pytest.raises(ValueError, match="read-only"):
        copy.tensors()["c"].values[0] = 0


def test_tiny_latte_step_models_are_bit_identical_to_whole_graph_folding(latte_stats):
    from qexport.calib.store import load

    from qexport.models.registry import load_model

    adapter = load_model("tiny-latte")
    stats = load(latte_stats)
    exported = export_fp(adapter, list(stats.layers))
    raw = onnx.ModelProto.FromString(exported.model.SerializeToString())
    base = load_graph(prepare(exported))
    steps = StepGraphs(base)
    quant = QuantConfig(smooth=Smooth.TSQ)
    for index in (0, 3):
        timestep = stats.header["timesteps"][index]
        got, want = steps.at(timestep), _fold_whole(raw, timestep)
        _assert_same_graph(got, want)
        weight = next(iter(exported.bindings.values())).weight
        assert got.tensors()[weight].values is base.tensors()[weight].values  # shared, not copied
        plan_got, model_got, *_ = _build_range(got, exported.bindings, [index], adapter, stats, quant, ORT_CPU)
        plan_want, model_want, *_ = _build_range(want, exported.bindings, [index], adapter, stats, quant, ORT_CPU)
        assert plan_got.folds == plan_want.folds and plan_got.folds.get("modulation", 0) > 0
        for layer, lp in plan_want.layers.items():
            assert np.array_equal(plan_got.layers[layer].a_scale, lp.a_scale)
            assert np.array_equal(plan_got.layers[layer].w_scale, lp.w_scale)
        assert model_got.SerializeToString() == model_want.SerializeToString()  # the emitted model, byte for byte
