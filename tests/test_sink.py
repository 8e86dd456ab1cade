import numpy as np
import onnx
import onnx_graphsurgeon as gs
from qexport.passes.sink import sink_smoothing
from sessions import cpu_session


def _graph(shared_product: bool = False) -> gs.Graph:
    rng = np.random.default_rng(0)
    a = gs.Variable("a", np.float32, [2, 64, 8])
    m = gs.Variable("m", np.float32, [2, 1, 8])
    b = gs.Variable("b", np.float32, [2, 1, 8])
    p, x, y, out = (gs.Variable(n, np.float32, [2, 64, 8]) for n in ("p", "x", "y", "out"))
    inv = gs.Constant("x::inv_s", rng.uniform(0.5, 2.0, 8).astype(np.float32))
    w = gs.Constant("w", rng.standard_normal((8, 4)).astype(np.float32))
    nodes = [
        gs.Node("Mul", "mod_scale", inputs=[a, m], outputs=[p]),
        gs.Node("Add", "mod_shift", inputs=[p, b], outputs=[x]),
        gs.Node("Mul", "x::smooth", inputs=[x, inv], outputs=[y]),
        gs.Node("MatMul", "linear", inputs=[y, w], outputs=[gs.Variable("o", np.float32, [2, 64, 4])]),
    ]
    outputs = [nodes[-1].outputs[0]]
    if shared_product:
        nodes.append(gs.Node("Identity", "other", inputs=[p], outputs=[out]))
        outputs.append(out)
    return gs.Graph(nodes=nodes, inputs=[a, m, b], outputs=outputs, opset=21)


def _run(graph: gs.Graph, feeds: dict) -> list[np.ndarray]:
    model = gs.export_onnx(graph)
    model.ir_version = 10
    onnx.checker.check_model(model)
    return cpu_session(model.SerializeToString()).run(None, feeds)


def test_sink_moves_smoothing_onto_modulation_operands_exactly():
    rng = np.random.default_rng(1)
    feeds = {
        k: rng.standard_normal(s).astype(np.float32) for k, s in (("a", (2, 64, 8)), ("m", (2, 1, 8)), ("b", (2, 1, 8)))
    }
    before = _run(_graph(), feeds)[0]
    graph = sink_smoothing(_graph(), None, None)
    big_muls = [n for n in graph.nodes if n.op == "Mul" and "a" in {t.name for t in n.inputs}]
    assert not any(n.name == "x::smooth" for n in graph.nodes)
    assert len(big_muls) == 1  # the modulation Mul; its other operand is now m/s
    small = [n for n in graph.nodes if n.op == "Mul" and n.inputs[1].name == "x::inv_s"]
    assert sorted(n.inputs[0].name for n in small) == ["b", "m"]
    np.testing.assert_allclose(_run(graph, feeds)[0], before, rtol=1e-5, atol=1e-5)


def test_sink_leaves_a_shared_product_alone():
    graph = sink_smoothing(_graph(shared_product=True), None, None)
    assert any(n.name == "x::smooth" for n in graph.nodes)
