"""The storage of a pipeline's text and VAE parts (recipe ``parts.precision``): each precision's part
loads in onnxruntime with the FP32 part's inputs and outputs, computes what the FP32 part computes
within the precision's error (FP16 storage: a few units of 2^-11; int8 weights: the per-channel
step), takes the disk the precision says, and is recorded in the manifest; a bad value is one error."""

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper

pytest.importorskip("transformers", minversion="5", reason="the tiny pipelines need transformers>=5")

from pipelines import FAMILIES, PROMPT, TEXT_TOKENS, call_kwargs
from qexport.exporter import part_precision
from qexport.exporter.part_precision import MIN_ELEMENTS, weight_axes, weight_bytes
from qexport.exporter.pipeline_parts import export_fp_pipeline
from qexport.exporter.text_encoders import export_text_part, text_parts
from qexport.exporter.vae import export_vae_decoder
from sessions import cpu_session

from qexport.errors import QexportError
from qexport.models.pipeline import load_pipeline, trace_call
from qexport.recipe import PartPrecision, Recipe, with_settings
from qexport.runtime.pipeline_loop import PipelineLoop

UNIT = 2.0**-11  # float16's unit roundoff: a stored weight is within UNIT of its value, relatively
FP16_PARTS = 4 * UNIT  # a part's outputs with FP16-stored weights, relative to the FP32 part's (measured <= 1.4 UNIT)
INT8_PARTS = 4  # a part's outputs with int8 weights, in units of its weights' relative error (measured <= 2.7)


def _session(path):
    return cpu_session(str(path))


def _relative(got, want):
    return float(np.linalg.norm(got - want) / np.linalg.norm(want))


def _io(model):
    return [(v.name, v.type.tensor_type.elem_type) for v in [*model.graph.input, *model.graph.output]]


def _eligible(model):
    """{name: fp32 values} of the initializers a precision converts (MIN_ELEMENTS floats or more)."""
    return {i.name: numpy_helper.to_array(i) for i in model.graph.initializer
            if i.data_type == onnx.TensorProto.FLOAT and np.prod(i.dims) >= MIN_ELEMENTS}  # fmt: skip


def _weights_error(stored, fp32):
    """Checks every int8 weight against its FP32 values (|q·s − w| <= s/2 elementwise, every
    MatMul / Gemm / Conv weight quantized); returns the largest relative rms error of a weight."""
    inits = {i.name: numpy_helper.to_array(i) for i in stored.graph.initializer}
    dequantize = {n.output[0]: n for n in stored.graph.node if n.op_type == "DequantizeLinear"}
    weights = {k: v for k, v in _eligible(fp32).items() if k in weight_axes(fp32.graph)}
    assert weights and set(dequantize) == set(weights), "every MatMul / Gemm / Conv weight is quantized"
    worst = 0.0
    for name, w in weights.items():
        node = dequantize[name]
        q, scale, zero = (inits[i] for i in node.input)
        axis = next(a.i for a in node.attribute if a.name == "axis")
        assert q.dtype == np.int8 and not zero.any() and axis == weight_axes(fp32.graph)[name], name
        shape = [-1 if a == axis else 1 for a in range(w.ndim)]
        error = q.astype(np.float32) * scale.reshape(shape) - w
        assert np.all(np.abs(error) <= scale.reshape(shape) / 2 * (1 + 1e-6)), f"{name} is off by more than half a step"
        worst = max(worst, _relative(w + error, w))
    return worst


def _check_precisions(export, feeds, tmp_path):
    """Export one part in each precision; check it against the FP32 part; returns {precision: (bytes, errors)}."""
    specs, outs, models = {}, {}, {}
    for p in PartPrecision:
        folder = tmp_path / p.value
        folder.mkdir(parents=True)
        specs[p] = export(folder, p)
        assert specs[p]["precision"] == p.value and specs[p]["data"] is None
        path = folder / specs[p]["model"]
        models[p] = onnx.load(str(path))
        outs[p] = _session(path).run(None, feeds)
    fp32 = models[PartPrecision.FP32]
    eligible = _eligible(fp32)
    half = sum(v.nbytes for v in eligible.values()) // 2
    figures = {}
    for p, model in models.items():
        assert _io(model) == _io(fp32), p  # the runtime feeds and reads the same dtypes
        errors = [_relative(a, b) for a, b in zip(outs[p], outs[PartPrecision.FP32], strict=True)]
        figures[p] = (weight_bytes(model), errors)
    fp16, int8 = models[PartPrecision.FP16], models[PartPrecision.INT8_WEIGHTS]
    assert weight_bytes(fp16) == weight_bytes(fp32) - half  # every eligible weight in half the bytes
    assert max(figures[PartPrecision.FP16][1]) <= FP16_PARTS, figures[PartPrecision.FP16][1]
    step = _weights_error(int8, fp32)
    quantized = {k: v for k, v in eligible.items() if k in weight_axes(fp32.graph)}
    channels = sum(v.shape[weight_axes(fp32.graph)[k]] for k, v in quantized.items())
    int8_bytes = weight_bytes(fp32) - half - sum(v.nbytes for v in quantized.values()) // 4 + 5 * channels
    assert weight_bytes(int8) == int8_bytes  # int8 weights in a quarter (half the fp16), scales and zeros beside
    assert 0 < max(figures[PartPrecision.INT8_WEIGHTS][1]) <= INT8_PARTS * step, (figures, step)
    return figures


@pytest.mark.parametrize("family", ["pixart-alpha", "sd3"])  # T5; two CLIPs with and without projection and T5
def test_a_text_part_in_each_precision(tmp_path, family):
    pipe = load_pipeline(FAMILIES[family](tmp_path / "src"))
    for part in text_parts(pipe):
        length = TEXT_TOKENS if part.takes_mask else 77
        ids = np.random.default_rng(0).integers(3, 100, (1, length)).astype(np.int64)
        feeds = {"input_ids": ids, **({"attention_mask": np.ones_like(ids)} if part.takes_mask else {})}
        _check_precisions(lambda folder, p, part=part, n=length: export_text_part(part, folder, n, p), feeds,
                          tmp_path / part.name)  # fmt: skip


def test_the_vae_decoder_in_each_precision(tmp_path):
    pipe = load_pipeline(FAMILIES["dit"](tmp_path / "src"))
    trace = trace_call(pipe, **call_kwargs("dit"))
    latents = torch.from_numpy(trace.results[-1][:1].astype(np.float32))
    z = np.random.default_rng(0).standard_normal((2, *latents.shape[1:])).astype(np.float32)
    _check_precisions(lambda folder, p: export_vae_decoder(pipe, latents, folder, precision=p), {"z": z},
                      tmp_path / "vae")  # fmt: skip


def test_a_part_over_the_limit_keeps_its_weights_in_one_external_file(tmp_path, monkeypatch):
    pipe = load_pipeline(FAMILIES["pixart-alpha"](tmp_path / "src"))
    (part,) = text_parts(pipe)
    feeds = {"input_ids": np.full((1, TEXT_TOKENS), 5, np.int64), "attention_mask": np.ones((1, TEXT_TOKENS), np.int64)}
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    inline = export_text_part(part, tmp_path / "a", TEXT_TOKENS)
    monkeypatch.setattr(part_precision, "EXTERNAL_ABOVE", 0)
    spec = export_text_part(part, tmp_path / "b", TEXT_TOKENS)
    assert inline["data"] is None and spec["data"] == "text_encoder.onnx.data"
    assert {p.name for p in (tmp_path / "b").iterdir()} == {spec["model"], spec["data"], spec["tokenizer"]}
    onnx.checker.check_model(str(tmp_path / "b" / spec["model"]))
    for got, want in zip(_session(tmp_path / "b" / spec["model"]).run(None, feeds),
                         _session(tmp_path / "a" / inline["model"]).run(None, feeds), strict=True):  # fmt: skip
        assert np.array_equal(got, want)


def test_the_recipe_option_defaults_to_fp16_round_trips_and_refuses_a_bad_value():
    assert Recipe().parts.precision is PartPrecision.FP16
    recipe = with_settings(Recipe(), ["parts.precision=int8-weights"])
    assert recipe.to_dict()["parts"] == {"precision": "int8-weights"}
    assert Recipe.from_dict(recipe.to_dict()) == recipe
    with pytest.raises(QexportError) as refused:
        with_settings(Recipe(), ["parts.precision=int4"])
    message = "recipe key 'parts.precision' must be one of 'fp16', 'fp32', 'int8-weights', got 'int4'"
    assert str(refused.value) == message


def test_an_edge_loop_with_fp16_parts_stays_within_fp16s_error(tmp_path):
    folder = FAMILIES["pixart-alpha"](tmp_path / "src")
    own = ("prompt", "num_inference_steps", "generator", "output_type")
    call = {k: v for k, v in call_kwargs("pixart-alpha").items() if k not in own}
    manifest = export_fp_pipeline(folder, tmp_path / "build", PROMPT, 3, call, precision=PartPrecision.FP16)
    p = manifest["pipeline"]
    assert [t["precision"] for t in p["text"]] == ["fp16"] and p["vae"]["precision"] == "fp16"
    other = "a burger eating a painting"
    trace = trace_call(load_pipeline(folder), prompt=other, num_inference_steps=3, output_type="np",
                       generator=torch.Generator("cpu").manual_seed(0), **call)  # fmt: skip
    latents, images = PipelineLoop(tmp_path / "build", manifest).run(other, trace.samples[0].astype(np.float32))
    assert images is not None
    want = np.asarray(trace.output[0] if isinstance(trace.output, tuple) else next(iter(trace.output.values())))
    # measured: latents 0.22 UNIT, pixels 0.15 UNIT (FP32 parts: 5e-7 and 2e-7)
    assert _relative(latents, trace.results[-1]) <= 2 * UNIT, _relative(latents, trace.results[-1])
    assert _relative(images, want.reshape(images.shape)) <= 2 * UNIT, _relative(images, want.reshape(images.shape))


def _hand_part() -> onnx.ModelProto:
    """x [1, 64] -> MatMul W1 -> Add b (too small to convert) -> MatMul W2 -> Add C (beyond fp16's range)."""
    from onnx import TensorProto, helper

    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.standard_normal(shape).astype(np.float32) * scale, name)
             for name, shape, scale in (("W1", (64, 64), 0.1), ("b", (64,), 1.0), ("W2", (64, 1024), 0.1),
                                        ("C", (1, 1024), 1e5))]  # fmt: skip
    nodes = [helper.make_node("MatMul", ["x", "W1"], ["h"]), helper.make_node("Add", ["h", "b"], ["g"]),
             helper.make_node("MatMul", ["g", "W2"], ["z"]), helper.make_node("Add", ["z", "C"], ["y"])]  # fmt: skip
    graph = helper.make_graph(nodes, "part", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 64])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 1024])], inits)  # fmt: skip
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)], ir_version=10)


@pytest.mark.parametrize("precision", list(PartPrecision))
def test_an_export_with_external_weights_converts_them_from_the_file_alike(tmp_path, precision, monkeypatch):
    """A large part's export keeps its weights in external data; each precision reads them tensor by
    tensor from there (the FP32 weights are never loaded whole) and stores what an inline export gives."""
    model = _hand_part()

    def inline(path):
        onnx.save_model(model, str(path))

    def external(path):
        onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=f"{path.name}.data", size_threshold=0)  # fmt: skip

    still_external = []  # initializers still in the export's file when the rest is loaded: none converted

    def load_rest(model, base_dir, load=part_precision.load_external_data_for_model):
        still_external.append({i.name for i in model.graph.initializer if i.data_location == onnx.TensorProto.EXTERNAL})
        load(model, base_dir)

    monkeypatch.setattr(part_precision, "load_external_data_for_model", load_rest)
    paths = {}
    for name, write in (("inline", inline), ("external", external)):
        (tmp_path / name).mkdir()
        paths[name] = tmp_path / name / "part.onnx"
        spec = part_precision.export_part(write, paths[name], precision)
        assert spec == {"precision": precision.value, "data": None}  # under the limit: saved inline
        assert [p.name for p in (tmp_path / name).iterdir()] == ["part.onnx"]  # the export's folder is gone
    a, b = (onnx.load(str(p)) for p in paths.values())
    assert [n.SerializeToString() for n in a.graph.node] == [n.SerializeToString() for n in b.graph.node]
    for x, y in zip(a.graph.initializer, b.graph.initializer, strict=True):  # equal, not byte-identical
        assert (x.name, x.data_type, list(x.dims)) == (y.name, y.data_type, list(y.dims))  # (data_location set)
        assert np.array_equal(numpy_helper.to_array(x), numpy_helper.to_array(y)), x.name
    stored = {i.name: i.data_type for i in b.graph.initializer}
    if precision != PartPrecision.FP32:  # C stays FP32 (beyond fp16), b stays (too small)
        assert stored["C"] == stored["b"] == onnx.TensorProto.FLOAT and "W1" not in stored and "W2" not in stored
    assert still_external == [set(), {"W1", "W2", "b", "C"} if precision == PartPrecision.FP32 else {"b", "C"}]
    x = {"x": np.random.default_rng(1).standard_normal((1, 64)).astype(np.float32)}
    assert np.array_equal(_session(paths["external"]).run(None, x)[0], _session(paths["inline"]).run(None, x)[0])
