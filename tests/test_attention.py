"""--quantize-attention: the attention matmuls' structure in the graph, the export-order torch
attention against diffusers', simulation vs onnxruntime, integer kernels, and the refusal of
statistics without prompts (tiny-latte, 4-step calibration; hand-made graphs)."""

import tempfile
from pathlib import Path

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import onnxruntime as ort
import pytest
import torch
from qexport.exporter.attention import ExportOrderAttention, attention_modules, attention_processors
from qexport.exporter.build import BuildConfig, build
from qexport.passes.attention import find_attention
from qexport.targets.catalog import ORT_CPU
from qexport.verification.verify import verify
from sessions import cpu_session

from qexport.errors import QexportError
from qexport.models.registry import load_model
from qexport.recipe import recipe_of

PROMPT = "a red circle moving left"


def _attention_graph(mask: bool) -> gs.Graph:
    """q·kᵀ (+ mask) -> Softmax -> ·v under the scope of module ``blocks.0.attn``."""
    scope = "/transformer/blocks.0/attn/"
    q, k, v = (gs.Variable(n, dtype=np.float32, shape=s) for n, s in (("q", [1, 2, 4, 8]), ("k", [1, 2, 8, 4]),
                                                                      ("v", [1, 2, 4, 8])))  # fmt: skip
    scores = gs.Variable("scores", dtype=np.float32)
    nodes = [gs.Node("MatMul", scope + "MatMul", inputs=[q, k], outputs=[scores])]
    if mask:
        masked = gs.Variable("masked", dtype=np.float32)
        bias = gs.Constant("mask", np.zeros((1, 1, 4, 4), np.float32))
        nodes.append(gs.Node("Add", scope + "Add", inputs=[scores, bias], outputs=[masked]))
        scores = masked
    probs, out = gs.Variable("probs", dtype=np.float32), gs.Variable("out", dtype=np.float32)
    nodes.append(gs.Node("Softmax", scope + "Softmax", attrs={"axis": -1}, inputs=[scores], outputs=[probs]))
    nodes.append(gs.Node("MatMul", scope + "MatMul_1", inputs=[probs, v], outputs=[out]))
    return gs.Graph(nodes=nodes, inputs=[q, k, v], outputs=[out])


@pytest.mark.parametrize("mask", [False, True])
def test_finds_qk_softmax_pv_under_the_module_scope(mask):
    sites = find_attention(_attention_graph(mask), {"blocks.0.attn": "/transformer/blocks.0/attn/"})
    site = sites["blocks.0.attn"]
    assert (site.qk, site.softmax, site.pv) == tuple(
        f"/transformer/blocks.0/attn/{n}" for n in ("MatMul", "Softmax", "MatMul_1")
    )


def test_an_attention_module_without_the_pattern_is_named():
    scopes = {"blocks.0.attn": "/transformer/blocks.0/attn/", "blocks.1.attn": "/transformer/blocks.1/attn/"}
    with pytest.raises(QexportError, match=r"attention module 'blocks.1.attn'.*found 0"):
        find_attention(_attention_graph(False), scopes)


def test_export_order_attention_matches_diffusers():
    transformer = load_model("tiny-latte").transformer
    torch.manual_seed(0)
    for name, module in list(attention_modules(transformer).items())[:2]:  # a self- and a cross-attention
        x = torch.randn(2, 64, 192)
        context = torch.randn(2, 8, 192) if module.is_cross_attention else None
        with torch.no_grad():
            ref = module(x, encoder_hidden_states=context)
            with attention_processors(transformer, {name: ExportOrderAttention()}):
                got = module(x, encoder_hidden_states=context)
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)


@pytest.fixture(scope="module")
def attention_build(latte_stats, tmp_path_factory):
    out = tmp_path_factory.mktemp("attn") / "out"
    recipe = recipe_of("smoothquant.mode=asq", "attention=on", "granularity.time_ranges=1")
    return build(latte_stats, out, BuildConfig(recipe=recipe))


def test_attention_matmuls_read_dequantized_inputs(attention_build):
    result = attention_build
    model = onnx.load(str(result.folder / "range_00.onnx"))
    producers = {o: n for n in model.graph.node for o in n.output}
    inits = {i.name: i for i in model.graph.initializer}

    def constant(t):  # an initializer, or computed from initializers alone (a weight's DequantizeLinear or Cast)
        return t in inits or (t in producers and all(constant(i) for i in producers[t].input))

    def activation(t):
        return not constant(t)

    attention = [n for n in model.graph.node if n.op_type == "MatMul" and all(activation(t) for t in n.input)]
    modules = result.manifest["quantization"]["attention"]["modules"]
    assert len(attention) == 2 * len(modules) == 24  # QK^T and PV of 8 spatial / cross + 4 temporal attentions
    for node in attention:
        for which, name in zip(("first", "second"), node.input, strict=True):
            dq = producers[name]
            assert dq.op_type == "DequantizeLinear", (
                f"Input {which} of attention MatMul {node.output[0]} is not quantized!"
            )
            assert producers[dq.input[0]].op_type == "QuantizeLinear"
            assert list(inits[dq.input[1]].dims) == [] and inits[dq.input[2]].data_type == onnx.TensorProto.UINT8
    aids = result.manifest["attention_ids"]
    for module in modules:  # the softmax output: [0, 1] on the uint8 grid
        scale = onnx.numpy_helper.to_array(inits[f"{aids[module]}:probs_scale"])
        zero = onnx.numpy_helper.to_array(inits[f"{aids[module]}:probs_zero"])
        assert float(scale) == np.float32(1 / 255) and int(zero) == 0
    assert result.manifest["legality"]["models"][0]["attention"]["quantized"] == 24
    assert all(len(r["attention_ranges"]) == len(modules) for r in result.manifest["ranges"])


def test_onnxruntime_runs_attention_on_integer_kernels_as_simulated(attention_build):
    result = attention_build
    v = verify(result.folder, result.adapter, [r.plan for r in result.ranges], result.manifest, ORT_CPU, PROMPT)
    assert v.ok, v.to_json()
    (check,) = v.models
    assert len(check.integer) == 64 and len(check.attention_integer) == 24
    assert not check.attention_emulated and not check.attention_float
    assert check.cosine_sim >= 0.999
    # what onnxruntime 1.31 fuses them into (measured): QK^T (followed by Softmax) -> MatMulIntegerToFloat;
    # PV -> QLinearMatMul, its output quantized by the output linear's QuantizeLinear, moved up through
    # Transpose / Reshape by QDQ propagation
    with tempfile.TemporaryDirectory() as tmp:
        opts = ort.SessionOptions()
        opts.optimized_model_filepath = str(Path(tmp) / "opt.onnx")
        opts.add_session_config_entry("session.optimized_model_external_initializers_file_name", "opt.bin")
        cpu_session(str(result.folder / "range_00.onnx"), opts)
        optimized = onnx.load(opts.optimized_model_filepath, load_external_data=False)
    reader = {i: n.op_type for n in optimized.graph.node for i in n.input}
    for module, aid in result.manifest["attention_ids"].items():
        assert reader[f"{aid}:query_q"] == reader[f"{aid}:key_q"] == "MatMulIntegerToFloat", module
        assert reader[f"{aid}:probs_q"] == reader[f"{aid}:value_q"] == "QLinearMatMul", module


def test_statistics_without_prompts_are_refused(bare_stats, tmp_path):
    recipe = recipe_of("attention=on", "granularity.time_ranges=1")
    with pytest.raises(QexportError, match="does not record its prompts, which the recipe's attention need"):
        build(bare_stats, tmp_path / "out", BuildConfig(recipe=recipe))
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_sixteen_bit_attention_is_emulated_on_onnxruntime(latte_stats, tmp_path):
    recipe = recipe_of("bits.activations=16", "attention=on", "granularity.time_ranges=1")
    result = build(latte_stats, tmp_path / "a16", BuildConfig(recipe=recipe))
    v = verify(result.folder, result.adapter, [r.plan for r in result.ranges], result.manifest, ORT_CPU, PROMPT)
    assert v.ok, v.to_json()
    (check,) = v.models
    assert len(check.attention_emulated) == 24 and not check.attention_integer and not check.attention_float


@pytest.mark.slow
def test_symmetric_int8_target_puts_probs_on_its_grid_and_runs_integer(latte_stats, tmp_path):
    from qexport.targets.catalog import get_profile

    recipe = recipe_of("smoothquant.mode=asq", "attention=on", "granularity.time_ranges=1", "target=tensorrt")
    result = build(latte_stats, tmp_path / "trt", BuildConfig(recipe=recipe))
    assert result.manifest["legality"]["models"][0]["violations"] == []
    plan = result.ranges[0].plan
    probs = {(float(a.probs.scale), int(a.probs.zero), str(a.probs.zero.dtype)) for a in plan.attention.values()}
    assert probs == {(float(np.float32(1 / 127)), 0, "int8")}  # [0, 1] on the symmetric int8 grid
    v = verify(result.folder, result.adapter, [plan], result.manifest, get_profile("tensorrt"), PROMPT)
    assert v.ok, v.to_json()
    assert len(v.models[0].attention_integer) == 24  # int8 x int8 attention fuses on onnxruntime too
