"""Build on the built-in tiny-latte / tiny-dit with short (4-step) calibrations: emission,
integer kernels in onnxruntime, QDQ structure, exact smoothing folds, weight sharing, errors."""

import json
import shutil

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import pytest
import torch
from qexport.calib.run import CalibConfig, calibrate
from qexport.calib.store import save
from qexport.exporter.build import BuildConfig, build, range_inputs, replan
from qexport.exporter.fp_export import StepGraphs, export_fp, load_graph, prepare
from qexport.passes.plan import QuantConfig, Smooth, plan_range
from qexport.passes.rewrite import PassConfig
from qexport.passes.sink import sink_smoothing
from qexport.passes.techniques.smoothquant import fold_smoothing
from qexport.targets.catalog import ORT_CPU
from qexport.verification.verify import verify
from sessions import cpu_session

from qexport.errors import QexportError
from qexport.models.registry import ModelRequest, load_model
from qexport.models.sampler import SamplingConfig
from qexport.recipe import recipe_of

STEPS = SamplingConfig(steps=4, cfg=7.0)


def _build(stats, tmp_path, name, smooth=Smooth.NONE, ranges=None, w_bits=8, a_bits=8):
    recipe = recipe_of(f"bits.weights={w_bits}", f"bits.activations={a_bits}",
                       f"granularity.time_ranges={'null' if ranges is None else ranges}",
                       *([] if smooth == Smooth.NONE else [f"smoothquant.mode={smooth}"]))  # fmt: skip
    return build(stats, tmp_path / name, BuildConfig(recipe=recipe))


def test_timestep_wise_tsq_emits_one_verified_integer_model_per_step(latte_stats, tmp_path):
    result = _build(latte_stats, tmp_path, "tsw", smooth=Smooth.TSQ)
    manifest = json.loads((tmp_path / "tsw" / "manifest.json").read_text())
    assert [r["model"] for r in manifest["ranges"]] == [f"step_{i:02d}.onnx" for i in range(4)]
    assert [s["timestep"] for s in manifest["steps"]] == [999, 749, 499, 249]
    assert all(i["name"] != "timestep" for i in manifest["inputs"])  # t baked in: its path folded away
    kept = [lp.w_q for r in result.ranges for lp in r.plan.layers.values()]
    assert all(not q.flags.owndata and not q.flags.writeable for q in kept)  # views of w.bin, not copies a step
    _, plans, _ = replan(result.manifest, latte_stats, folder=result.folder)  # what qexport verify re-plans
    again = [lp.w_q for p in plans for lp in p.layers.values()]
    assert all(not q.flags.owndata and np.array_equal(q, k) for q, k in zip(again, kept, strict=True))
    v = verify(result.folder, result.adapter, [r.plan for r in result.ranges], result.manifest, ORT_CPU,
               "a red circle moving left")  # fmt: skip
    assert v.ok, v.to_json()
    assert all(len(m.integer) == 64 and not m.float_ for m in v.models)
    assert all(m.cosine_sim >= 0.999 for m in v.models)
    assert v.end_to_end["psnr_db"] > 20


@pytest.mark.parametrize("ranges", [1, 2])
def test_time_ranges_emit_k_models_that_load(latte_stats, tmp_path, ranges):
    result = _build(latte_stats, tmp_path, f"r{ranges}", smooth=Smooth.ASQ, ranges=ranges)
    files = sorted(p.name for p in result.folder.glob("range_*.onnx"))
    assert files == [f"range_{i:02d}.onnx" for i in range(ranges)]
    assert (result.folder / "text_encoder.onnx").is_file()  # the edge loop's caption encoder
    for f in files:
        model = onnx.load(str(result.folder / f), load_external_data=False)
        assert model.ir_version <= 13 and model.opset_import[0].version == 21
        onnx.checker.check_model(str(result.folder / f))
        cpu_session(str(result.folder / f))


def test_every_quantized_matmul_reads_dequantized_inputs(latte_stats, tmp_path):
    result = _build(latte_stats, tmp_path, "q", smooth=Smooth.ASQ, ranges=1)
    model = onnx.load(str(result.folder / "range_00.onnx"))
    producers = {o: n for n in model.graph.node for o in n.output}
    inits = {i.name: i for i in model.graph.initializer}
    ids = result.manifest["layer_ids"]
    for layer, lid in ids.items():
        matmul = next(n for n in model.graph.node if n.op_type == "MatMul" and n.input[1] == f"{lid}:w_dq")
        for which, name in (("activation", matmul.input[0]), ("weight", matmul.input[1])):
            assert producers[name].op_type == "DequantizeLinear", f"Input {which} of {layer} is not quantized!"
        w_dq = producers[matmul.input[1]]
        assert inits[w_dq.input[0]].data_type == onnx.TensorProto.INT8
        assert list(inits[w_dq.input[1]].dims) == [inits[w_dq.input[0]].dims[1]]  # per output channel
        assert next(a.i for a in w_dq.attribute if a.name == "axis") == 1
        a_dq = producers[matmul.input[0]]
        assert list(inits[a_dq.input[1]].dims) == [] and inits[a_dq.input[2]].data_type == onnx.TensorProto.UINT8
        assert producers[a_dq.input[0]].op_type == "QuantizeLinear"


@pytest.mark.parametrize("ranges", [None, 1])
def test_folded_smoothing_is_exact_in_fp(latte_stats, ranges):
    from qexport.calib.store import load

    adapter = load_model("tiny-latte")
    stats = load(latte_stats)
    fp = prepare(export_fp(adapter, list(stats.layers)))
    graph = load_graph(fp) if ranges is not None else StepGraphs(load_graph(fp)).at(749)
    reference = gs.export_onnx(graph.copy())
    nodes, groups, weights, biases = range_inputs(graph, fp.bindings, adapter)
    plan = plan_range(
        [1], groups, stats.layers, weights, biases, QuantConfig(smooth=Smooth.TSQ), ORT_CPU, keep_float=True
    )
    folds = {g.fold for g in groups}
    assert ("modulation" in folds) == (ranges is None) and "value" in folds and "explicit" in folds
    config = PassConfig(plan=plan, groups=groups, nodes=nodes)
    smoothed = sink_smoothing(fold_smoothing(graph, config, ORT_CPU), config, ORT_CPU)  # sinking is exact too
    for n, b in fp.bindings.items():
        smoothed.tensors()[b.weight].values = plan.layers[n].w_float
    rng = np.random.default_rng(0)
    feeds = {"latents": rng.standard_normal((2, 3, 16, 32, 32)).astype(np.float32),
             "cond": adapter.conditioner.null(2).numpy()}  # fmt: skip
    if ranges is not None:
        feeds["timestep"] = np.array([749, 749])
    run = lambda m: cpu_session(m.SerializeToString()).run(None, feeds)[0]  # noqa: E731
    ref, got = run(reference), run(gs.export_onnx(smoothed.cleanup().toposort()))
    assert np.abs(got - ref).max() <= 1e-5 * np.abs(ref).max() * 10, np.abs(got - ref).max()
    assert max(np.abs(s - 1).max() for s in plan.smooth.values()) > 0.5  # smoothing really moved scale


def test_planning_holds_float64_weights_of_the_layers_in_flight_only(latte_stats, monkeypatch):
    import qexport.passes.plan as planning
    from qexport.calib.store import load
    from qexport.passes.rangeplan import FinalWeights

    live: list[int] = []

    class Watched(FinalWeights):
        def __setitem__(self, layer, value):
            super().__setitem__(layer, value)
            live.append(len(self))

    monkeypatch.setattr(planning, "FinalWeights", Watched)
    monkeypatch.setattr(planning, "PLAN_THREADS", 2)  # linears quantized beside the group being planned
    adapter = load_model("tiny-latte")
    stats = load(latte_stats)
    fp = prepare(export_fp(adapter, list(stats.layers)))
    graph = StepGraphs(load_graph(fp)).at(749)
    _, groups, weights, biases = range_inputs(graph, fp.bindings, adapter)
    plan = planning.plan_range([1], groups, stats.layers, weights, biases, QuantConfig(smooth=Smooth.TSQ), ORT_CPU)
    assert list(plan.layers) == list(weights)  # every layer planned, in the weights' order
    widest = max(len(g.layers) for g in groups)
    assert {g.fold for g in groups} >= {"value"}  # value projections wait for their attention's output group
    assert max(live) <= widest + 1 + 2 < len(weights) / 4, (max(live), widest, len(weights))


def test_final_weights_apply_waiting_scalings_in_order_when_made():
    """Scalings of a weight not yet made wait and are applied in order when it is made: the same
    float64 array, bit for bit, as applying them in place on a made one; released weights refuse."""
    from qexport.passes.rangeplan import FinalWeights

    rng = np.random.default_rng(0)
    w = rng.standard_normal((6, 4)).astype(np.float32)
    s_in, s_out, s_in2 = rng.uniform(0.1, 3, 6), rng.uniform(0.1, 3, 4), rng.uniform(0.1, 3, 6)
    lazy, eager = FinalWeights({"a": w}), FinalWeights({"a": w})
    eager["a"]  # made first: the scalings act in place
    for final in (lazy, eager):
        final.scale_rows("a", s_in)
        final.divide_columns("a", s_out)
        final.scale_rows("a", s_in2)
    assert "a" not in lazy and "a" in eager
    expected = w.astype(np.float64) * s_in[:, None] / s_out[None, :] * s_in2[:, None]
    assert np.array_equal(lazy["a"], expected) and np.array_equal(eager["a"], expected)
    lazy.release("a")
    with pytest.raises(KeyError, match="released"):
        lazy.scale_rows("a", s_in)


def test_tsw_without_tsq_costs_about_one_model_of_disk(latte_stats, tmp_path):
    tsw = _build(latte_stats, tmp_path, "asq_tsw", smooth=Smooth.ASQ)
    one = _build(latte_stats, tmp_path, "asq_one", smooth=Smooth.ASQ, ranges=1)
    size = lambda d: sum(p.stat().st_size for p in d.iterdir() if p.name != "manifest.json")  # noqa: E731
    assert size(tsw.folder) <= 1.15 * size(one.folder), (size(tsw.folder), size(one.folder))
    first, last = tsw.ranges[0].plan.layers, tsw.ranges[-1].plan.layers
    assert all(last[k].w_q is first[k].w_q for k in first)  # the plans kept in memory share them too


def test_w4a8_and_w8a16_build_and_run_as_emulated_qdq(latte_stats, tmp_path):
    for name, kw, storage in (("w4a8", dict(w_bits=4), onnx.TensorProto.INT4), ("w8a16", dict(a_bits=16), None)):
        result = _build(latte_stats, tmp_path, name, smooth=Smooth.ASQ, ranges=1, **kw)
        v = verify(result.folder, result.adapter, [r.plan for r in result.ranges], result.manifest, ORT_CPU,
                   "a red circle moving left")  # fmt: skip
        assert v.ok and not v.native and all(len(m.emulated) == 64 for m in v.models), v.to_json()
        model = onnx.load(str(result.folder / "range_00.onnx"), load_external_data=False)
        types = {i.data_type for i in model.graph.initializer}
        assert storage is None or storage in types
        assert storage is not None or onnx.TensorProto.UINT16 in types


def test_dit_labels_build(tmp_path):
    adapter = load_model("tiny-dit")
    path = tmp_path / "dit.qstats"
    save(calibrate(adapter, CalibConfig(prompts=("red circle", "blue square"), sampling=STEPS)).stats, path)
    result = build(
        path, tmp_path / "dit", BuildConfig(recipe=recipe_of("smoothquant.mode=asq", "granularity.time_ranges=2"))
    )
    v = verify(result.folder, result.adapter, [r.plan for r in result.ranges], result.manifest, ORT_CPU, "red circle")
    assert v.ok and all(len(m.integer) == 36 for m in v.models)


def test_bad_requests_fail_before_work_and_leave_nothing(latte_stats, tmp_path, smoke_models):
    out = tmp_path / "out"
    with pytest.raises(QexportError, match=r"bits\.weights"):
        recipe_of("bits.weights=9")
    with pytest.raises(QexportError, match=r"time_ranges' must be in 1\.\.4"):
        build(latte_stats, out, BuildConfig(recipe=recipe_of("granularity.time_ranges=5")))
    with pytest.raises(QexportError, match="unknown target"):
        build(latte_stats, out, BuildConfig(recipe=recipe_of("target=nope")))
    from qexport.targets.catalog import PROFILES
    from qexport.targets.profile import TargetProfile

    no_int4 = TargetProfile(**{**ORT_CPU.__dict__, "name": "int8-only", "weight_storage": {8: "int8"}})
    PROFILES["int8-only"] = no_int4
    try:
        with pytest.raises(QexportError, match="cannot store 4-bit weights: it has no 4-bit weight type"):
            build(latte_stats, out, BuildConfig(recipe=recipe_of("bits.weights=4", "target=int8-only")))
    finally:
        del PROFILES["int8-only"]
    out.mkdir()
    with pytest.raises(QexportError, match="exists; pass --force"):
        build(latte_stats, out, BuildConfig())
    shutil.rmtree(out)
    # statistics of another model (same id, different weights/config) are refused naming both
    from qexport.calib.store import load

    stats = load(latte_stats)
    stats.header["model_id"] = f"diffusers:{smoke_models / 'tiny-dit'}"
    other = tmp_path / "other.qstats"
    save(stats, other)
    with pytest.raises(QexportError, match=r"calibrated on model 'diffusers:.*tiny-dit'"):
        build(other, out, BuildConfig(), model=ModelRequest(trust_model_path=True))
    assert not out.exists() and not list(tmp_path.glob(".out.building-*"))


@pytest.mark.slow
def test_alpha_auto_searches_per_range_and_replans(latte_stats, tmp_path):
    from qexport.exporter.build import replan

    recipe = recipe_of("smoothquant.mode=tsq", "smoothquant.alpha=auto", "granularity.time_ranges=2")
    result = build(latte_stats, tmp_path / "auto", BuildConfig(recipe=recipe))
    alphas = [r["alpha"] for r in result.manifest["ranges"]]
    assert result.manifest["quantization"]["alpha"] == "auto" and all(0.1 <= a <= 1.0 for a in alphas)
    # the first range's search goes coarse to fine; the second climbs from the first's alpha: the
    # alphas it scored are a run of neighbours around that start, no coarse points beyond them
    from qexport.exporter.search import ALPHAS

    first, second = (sorted(map(float, r["search_sqnr_db"]["alpha"])) for r in result.manifest["ranges"])
    assert {0.1, 0.4, 0.7, 1.0} <= set(first)
    tried = [ALPHAS.index(a) for a in second]
    assert alphas[0] in second and tried == list(range(tried[0], tried[-1] + 1)) and len(tried) < len(ALPHAS)
    _, plans, _ = replan(result.manifest, latte_stats)
    for old, new in zip(result.ranges, plans, strict=True):
        assert new.alpha == old.plan.alpha
        layer = next(iter(old.plan.layers))
        assert np.array_equal(new.layers[layer].w_q, old.plan.layers[layer].w_q)


def test_shape_inference_runs_on_a_skeleton_without_weight_data():
    import qexport.exporter.shapes as shapes
    from onnx import TensorProto, helper, numpy_helper

    weight = numpy_helper.from_array(np.ones((64, 64), np.float32), "W")  # 16 KiB: stubbed (dtype + dims)
    assert len(weight.raw_data) >= shapes.STUB_BYTES
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "W"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 64])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], [weight])  # fmt: skip
    model = helper.make_model(graph)
    out = shapes.infer_shapes(model)  # the same path for a model over protobuf's 2 GB limit
    assert out is model
    assert [d.dim_value for d in out.graph.output[0].type.tensor_type.shape.dim] == [2, 64]
    assert out.graph.initializer[0].data_location == TensorProto.DEFAULT
    assert numpy_helper.to_array(out.graph.initializer[0]).sum() == 4096  # weights untouched, in memory


def test_shape_inference_stubs_large_constant_nodes_too(monkeypatch):
    import onnx
    import qexport.exporter.shapes as shapes
    from onnx import TensorProto, helper, numpy_helper

    table = numpy_helper.from_array(np.ones((64, 64), np.float32))  # 16 KiB in a Constant node
    nodes = [helper.make_node("Constant", [], ["c"], value=table), helper.make_node("Add", ["x", "c"], ["y"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [64, 64])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)])  # fmt: skip
    model = helper.make_model(graph)
    seen = []
    real = onnx.shape_inference.infer_shapes
    monkeypatch.setattr(onnx.shape_inference, "infer_shapes", lambda m: seen.append(m.ByteSize()) or real(m))
    out = shapes.infer_shapes(model)
    assert [d.dim_value for d in out.graph.output[0].type.tensor_type.shape.dim] == [64, 64]
    assert seen[0] < 1024 < model.ByteSize()  # the skeleton holds no tensor data
    assert numpy_helper.to_array(out.graph.node[0].attribute[0].t).sum() == 4096  # the model's own is untouched


def test_verify_a_subset_of_models_skips_the_loop_and_refuses_bad_indexes(latte_stats, tmp_path):
    result = _build(latte_stats, tmp_path, "r2", smooth=Smooth.ASQ, ranges=2)
    plans = [r.plan for r in result.ranges]
    v = verify(result.folder, result.adapter, plans, result.manifest, ORT_CPU, "a red circle moving left", only=[1])
    assert [m.model for m in v.models] == ["range_01.onnx"] and v.ok, v.to_json()
    assert v.end_to_end == {}
    with pytest.raises(QexportError, match="no model 2 in this build"):
        verify(result.folder, result.adapter, plans, result.manifest, ORT_CPU, "a red circle moving left", only=[2])
    if not torch.cuda.is_available():  # --device cuda on a machine without one: one clear error
        with pytest.raises(QexportError, match="torch sees no CUDA device here; use --device cpu"):
            verify(result.folder, result.adapter, plans, result.manifest, ORT_CPU, "a circle", only=[0], device="cuda")


@pytest.mark.slow
def test_work_done_ahead_on_a_gpu_builds_the_same_files_on_the_cpu(latte_stats, tmp_path, monkeypatch):
    # a GPU build plans the next alpha candidate while one is scored, and makes the next range's GPTQ
    # Gram matrices while a model is written, each on a thread of its own; forced here on the CPU,
    # the plans, choices and written files are those of doing one thing at a time
    from qexport.exporter import build as build_module

    recipe = recipe_of("smoothquant.mode=tsq", "smoothquant.alpha=auto", "granularity.time_ranges=2",
                       "channel_shift=on", "gptq=on")  # fmt: skip
    alone = build(latte_stats, tmp_path / "alone", BuildConfig(recipe=recipe))
    searched, grams_ahead, started = build_module.best, build_module._grams_ahead, []
    monkeypatch.setattr(build_module, "best", lambda *a, **k: searched(*a, **{**k, "ahead": True}))

    def on_a_gpu(replay, quant, steps, total, device):
        ahead = grams_ahead(replay, quant, steps, total, "cuda")
        return None if ahead is None else lambda groups: started.append(steps) or ahead(groups)

    monkeypatch.setattr(build_module, "_grams_ahead", on_a_gpu)
    ahead = build(latte_stats, tmp_path / "ahead", BuildConfig(recipe=recipe))
    assert started == [ahead.ranges[1].steps]  # the second range's, while the first's model was written
    searches = [[r["search_sqnr_db"] for r in result.manifest["ranges"]] for result in (alone, ahead)]
    assert searches[0] == searches[1]

    def files(name):
        return sorted(p.name for p in (tmp_path / name).iterdir() if p.suffix in (".onnx", ".bin"))

    assert files("alone") and files("alone") == files("ahead")
    for name in files("alone"):
        assert (tmp_path / "alone" / name).read_bytes() == (tmp_path / "ahead" / name).read_bytes(), name
