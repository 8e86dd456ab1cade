"""The integer-only qnn-htp-integer target: the pass on tiny graphs (data movement keeps its input's
grid, constants quantized, the broadcast constant expanded), and a random tiny Latte built for it
that the legality report finds free of float activations and that runs on Qualcomm's HTP backend
(onnxruntime-qnn, simulated on x86-64) without FP16, CPU fallback off, every QNN op fixed-point."""

import json

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import pytest
from onnx import TensorProto, helper, numpy_helper
from qexport.exporter.build import BuildConfig, build
from qexport.exporter.fp_export import stamp
from qexport.passes.integer_only import integer_only, observed_tensors
from qexport.targets.catalog import get_profile
from qexport.targets.legality import check_model
from qexport.verification import qnn_run
from sessions import cpu_session
from test_qnn_htp import TRUSTED, htp_vs_cpu, per_model_contexts, tiny_build  # noqa: F401  (the random tiny Latte and its statistics)

from qexport.errors import QexportError
from qexport.recipe import recipe_of

INTEGER = get_profile("qnn-htp-integer")
HTP = pytest.mark.skipif(
    not qnn_run.available(), reason="onnxruntime-qnn is not installed (pip install 'qexport[qnn]')"
)


def _graph() -> onnx.ModelProto:
    """x -> LayerNorm(gamma, beta) -> Add(pos [1, 4, 8]) -> Reshape -> Transpose -> Mul(0.5) -> y."""
    nodes = [
        helper.make_node("LayerNormalization", ["x", "gamma", "beta"], ["n"], axis=-1),
        helper.make_node("Add", ["n", "pos"], ["a"]),
        helper.make_node("Reshape", ["a", "shape"], ["r"]),
        helper.make_node("Transpose", ["r"], ["t"], perm=[0, 2, 1]),
        helper.make_node("Mul", ["t", "half"], ["y"]),
    ]
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.uniform(0.5, 1.5, 8).astype(np.float32), "gamma"),
             numpy_helper.from_array(rng.uniform(-0.1, 0.1, 8).astype(np.float32), "beta"),
             numpy_helper.from_array(rng.uniform(-1, 1, (1, 4, 8)).astype(np.float32), "pos"),
             numpy_helper.from_array(np.array([2, 8, 4], np.int64), "shape"),
             numpy_helper.from_array(np.array(0.5, np.float32), "half")]  # fmt: skip
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4, 8])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 4, 8])
    model = helper.make_model(
        helper.make_graph(nodes, "g", [x], [y], inits), opset_imports=[helper.make_opsetid("", 21)]
    )
    stamp(model)
    return onnx.shape_inference.infer_shapes(model)


def test_the_pass_quantizes_every_activation_and_constant():
    model = _graph()
    graph = gs.import_onnx(model)
    names = observed_tensors(graph)
    assert set(names) == {"x", "n", "a", "y"}  # the Reshape and Transpose outputs reuse their input's grid
    x = np.random.default_rng(1).standard_normal((2, 4, 8)).astype(np.float32)
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    probe.graph.output.extend(helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in names if n != "y")
    values = dict(zip([o.name for o in probe.graph.output],
                      cpu_session(probe.SerializeToString()).run(None, {"x": x}), strict=True))  # fmt: skip
    ranges = {n: (float(values[n].min()), float(values[n].max())) for n in names}
    out = gs.export_onnx(integer_only(graph, ranges, INTEGER))
    report = check_model(out, INTEGER, "g.onnx")
    assert report.ok, [str(v) for v in report.violations]
    assert {n.status for n in report.nodes} == {"quantized", "qdq"}
    inits = {i.name: numpy_helper.to_array(i) for i in out.graph.initializer}
    producer = {o: n for n in out.graph.node for o in n.output}
    norm = next(n for n in out.graph.node if n.op_type == "LayerNormalization")
    assert inits[producer[norm.input[1]].input[0]].dtype == np.uint8  # gamma: HTP takes an unsigned scale
    assert inits[producer[norm.input[2]].input[0]].dtype == np.int32  # beta on the scale s_x * s_gamma
    add = next(n for n in out.graph.node if n.op_type == "Add")
    assert inits[producer[add.input[1]].input[0]].shape == (2, 4, 8)  # the broadcast constant expanded
    for op in ("Reshape", "Transpose"):
        node = next(n for n in out.graph.node if n.op_type == op)
        after = next(n for n in out.graph.node if node.output[0] in n.input)
        assert list(producer[node.input[0]].input[1:]) == list(after.input[1:])  # one grid in and out
    got = cpu_session(out.SerializeToString()).run(None, {"x": x})[0]
    want = cpu_session(model.SerializeToString()).run(None, {"x": x})[0]
    assert np.abs(got - want).max() < 2e-3 * np.abs(want).max()


def test_legality_names_a_float_activation():
    report = check_model(_graph(), INTEGER, "g.onnx")
    rules = {v.rule for v in report.violations}
    assert rules == {"integer-only"}
    assert any(v.tensor == "n" and "not quantized" in v.detail for v in report.violations)
    assert check_model(_graph(), get_profile("qnn-htp"), "g.onnx").ok  # FP16 islands are legal there


@pytest.fixture(scope="module")
def integer_build(tiny_build):  # noqa: F811
    """The tiny Latte's statistics built W8A16 for qnn-htp-integer."""
    root = tiny_build.folder.parent
    recipe = recipe_of("bits.activations=16", "smoothquant.mode=asq", "target=qnn-htp-integer")
    return build(root / "s.qstats", root / "integer", BuildConfig(recipe=recipe), model=TRUSTED)


def test_integer_build_has_no_float_activation(integer_build):
    for name in ("step_00.onnx", "step_01.onnx"):
        report = check_model(onnx.load(str(integer_build.folder / name)), INTEGER, name)
        assert report.ok, [str(v) for v in report.violations]
        assert {n.status for n in report.nodes} == {"quantized", "qdq"}
    manifest = json.loads((integer_build.folder / "manifest.json").read_text())
    assert "target_device" not in manifest  # no FP16 SoC assumed: the backend's default SoC


@HTP
def test_integer_build_runs_on_htp_without_fp16(integer_build, tmp_path):
    path = integer_build.folder / "step_01.onnx"
    session = qnn_run.htp_session(path, INTEGER, graph_dir=tmp_path)  # fallback off, FP16 not enabled
    agreement = htp_vs_cpu(session, path)
    assert agreement >= 0.999, agreement
    graph = json.loads(next(p for p in tmp_path.glob("*.json") if not p.name.endswith("_tensor_log.json")).read_text())
    tensors = graph["graph"]["tensors"]
    nodes = graph["graph"]["nodes"].values()
    touches_float = [n for n in nodes if any(int(tensors[t]["data_type"]) >> 8 == 2  # QNN class 2: float
                                             for t in (*n["input_names"], *n["output_names"]))]  # fmt: skip
    float_ops = {n["type"] for n in touches_float}
    assert float_ops == {"Quantize", "Dequantize"}  # only the graph's inputs and output are float


@HTP
def test_an_integer_build_compiles_to_contexts_and_runs_from_them_on_htp(integer_build, tmp_path):
    """qexport contexts takes an integer-only build (an HTP without FP16); the edge loop runs from them."""
    from qexport.metrics import cosine
    from qexport.runtime.conditioning import Conditioning
    from qexport.runtime.loop import Pipeline
    from qexport.runtime.qnn import model_opener

    folder, _ = per_model_contexts(integer_build.folder, tmp_path)
    manifest = json.loads((folder / "manifest.json").read_text())
    conditioning = Conditioning(folder, manifest)
    cond, null = conditioning.encode("a red circle moving left"), conditioning.null()
    on_htp = Pipeline(folder, manifest=manifest, open_model=model_opener(folder, manifest)).run(cond, null, 0)
    on_cpu = Pipeline(folder, manifest=manifest).run(cond, null, 0)
    assert cosine(on_htp.latents, on_cpu.latents) >= 0.999  # the loop from the contexts agrees with onnxruntime CPU


def test_integer_only_refuses_precompute_kv(tiny_build, tmp_path):  # noqa: F811
    recipe = recipe_of("target=qnn-htp-integer", "precompute_kv=on")
    with pytest.raises(QexportError, match="cannot be built with precompute_kv"):
        build(tiny_build.folder.parent / "s.qstats", tmp_path / "kv", BuildConfig(recipe=recipe))


def test_verify_judges_an_integer_only_build_by_cosine_and_reports_its_lsb(integer_build):
    from click.testing import CliRunner

    from qexport.cli import cli

    folder = integer_build.folder
    stats = folder.parent / "s.qstats"
    result = CliRunner().invoke(cli, ["verify", str(folder), "--stats", str(stats), "--trust-model-path"])
    rows = json.loads((folder / "manifest.json").read_text())["verification"]["models"]
    assert rows and all(r["lsb_judged"] is False for r in rows)
    assert all(r["cosine_sim"] >= 0.999 and r["float"] == [] for r in rows), rows  # uint16: emulated on CPU
    assert result.exit_code == 0, result.output
    assert "every activation is requantized to 16 bits" in result.output


def test_integer_only_refuses_8_bit_activations(tiny_build, tmp_path):  # noqa: F811
    recipe = recipe_of("smoothquant.mode=asq", "target=qnn-htp-integer")  # W8A8
    with pytest.raises(QexportError, match=r"set bits\.activations=16"):
        build(tiny_build.folder.parent / "s.qstats", tmp_path / "a8", BuildConfig(recipe=recipe))
    assert not (tmp_path / "a8").exists()


def test_only_builds_for_the_htp_backend_are_compiled_or_run_there(tmp_path):
    from qexport.exporter.qnn_context import compile_contexts

    INTEGER.check_htp()
    get_profile("qnn-htp").check_htp()
    with pytest.raises(QexportError, match="a build for target ort-cpu does not run on the HTP backend"):
        compile_contexts(tmp_path, {"target": "ort-cpu"}, "per-model")
    assert not (tmp_path / "context").exists()
