"""A tiny random Latte (one spatial and one temporal block, patchify and unpatchify included)
built for qnn-htp, opened on Qualcomm's HTP backend (onnxruntime-qnn, simulated on x86-64) with
CPU fallback disabled, and run: it must agree with onnxruntime CPU on the same file."""

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from qexport.calib.run import CalibConfig, calibrate
from qexport.calib.store import save
from qexport.exporter.build import BuildConfig, build
from qexport.targets.catalog import get_profile
from qexport.targets.legality import check_model
from qexport.verification import qnn_run
from sessions import cpu_session

from qexport.errors import QexportError
from qexport.metrics import cosine
from qexport.models.registry import ModelRequest, load_model
from qexport.models.sampler import SamplingConfig
from qexport.recipe import recipe_of

LATTE = dict(num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8, num_layers=1,
             cross_attention_dim=16, sample_size=8, patch_size=2, norm_type="ada_norm_single",
             num_embeds_ada_norm=1000, caption_channels=16, video_length=2, norm_elementwise_affine=False)  # fmt: skip
TRUSTED = ModelRequest(trust_model_path=True)  # the statistics name the folder tiny_build saved


@pytest.fixture(scope="module")
def tiny_build(tmp_path_factory):
    """A W8A16 qnn-htp build (2 steps) of a random tiny Latte saved as a diffusers folder."""
    from diffusers import DDIMScheduler, LatteTransformer3DModel

    from qexport.models.text_encoder import CaptionEncoder, CaptionEncoderConfig

    root = tmp_path_factory.mktemp("qnn")
    torch.manual_seed(0)
    LatteTransformer3DModel(**LATTE).save_pretrained(root / "model" / "transformer")
    DDIMScheduler(num_train_timesteps=1000).save_pretrained(root / "model" / "scheduler")
    CaptionEncoder(CaptionEncoderConfig(dim=16, heads=2, layers=1)).save(root / "model" / "text_encoder")
    adapter = load_model(f"diffusers:{root / 'model'}")
    config = CalibConfig(prompts=("a red circle moving left",), sampling=SamplingConfig(steps=2, cfg=3.0))
    save(calibrate(adapter, config).stats, root / "s.qstats")
    recipe = recipe_of("bits.activations=16", "smoothquant.mode=asq", "target=qnn-htp")
    return build(root / "s.qstats", root / "out", BuildConfig(recipe=recipe), model=TRUSTED)


def test_qnn_htp_build_is_closed_and_rank_limited(tiny_build):
    target = get_profile("qnn-htp")
    model = onnx.load(str(tiny_build.folder / "step_00.onnx"))
    report = check_model(model, target, "step_00.onnx")
    assert report.ok, [str(v) for v in report.violations]
    producer = {o: n for n in model.graph.node for o in n.output}
    users = {}
    for n in model.graph.node:
        for t in n.input:
            users.setdefault(t, []).append(n)
    linears = [
        n
        for n in model.graph.node
        if n.op_type == "MatMul" and producer.get(n.input[1], n).op_type == "DequantizeLinear"
    ]
    assert linears
    for n in linears:
        after = users[n.output[0]]
        assert [a.op_type for a in after] == ["QuantizeLinear"], f"output of {n.output[0]} is not quantized"
    assert not [n for n in model.graph.node if n.op_type == "Einsum"]


@pytest.mark.skipif(not qnn_run.available(), reason="onnxruntime-qnn is not installed (pip install 'qexport[qnn]')")
def test_tiny_build_runs_wholly_on_htp_and_agrees_with_cpu(tiny_build):
    path = tiny_build.folder / "step_00.onnx"
    session = qnn_run.htp_session(path, get_profile("qnn-htp"))  # fallback off: any CPU node is an error
    agreement = htp_vs_cpu(session, path)
    assert agreement >= 0.999, agreement


def htp_vs_cpu(session: ort.InferenceSession, path) -> float:
    """Cosine between a session on HTP and onnxruntime CPU on the same file, from seeded random inputs."""
    rng = np.random.default_rng(0)
    feeds = {i.name: rng.standard_normal(i.shape).astype(np.float32) for i in session.get_inputs()}
    cpu = cpu_session(str(path)).run(None, feeds)[0]
    return cosine(session.run(None, feeds)[0], cpu)


@pytest.mark.skipif(not qnn_run.available(), reason="onnxruntime-qnn is not installed (pip install 'qexport[qnn]')")
def test_verify_on_htp_reads_the_kernels_off_the_compiled_graph(tiny_build):
    from click.testing import CliRunner

    from qexport.cli import cli

    folder = tiny_build.folder
    stats = folder.parent / "s.qstats"
    result = CliRunner().invoke(cli, ["verify", str(folder), "--stats", str(stats), "--runtime", "qnn-htp",
                                      "--trust-model-path"])  # fmt: skip
    assert result.exit_code == 0, result.output
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["target_device"] == {"soc_model": "57", "htp_arch": "75", "float_ops": "fp16"}
    v = manifest["verification"]
    layers = len(manifest["layer_ids"])
    for row in v["models"]:
        htp = row["second"]
        assert htp["runtime"] == "qnn-htp" and htp["integer"] == layers and htp["float"] == [], htp
        assert htp["cosine_sim"] >= 0.999
        assert sum(htp["backend_ops"].values()) > 0 and htp["backend_ops"].get("FullyConnected", 0) >= layers // 2
    assert np.isfinite(v["end_to_end"]["psnr_db_htp"])  # the loop with every step model on HTP
    assert "end to end on the HTP backend" in result.output


def test_compiled_kernels_call_a_float_linear_float():
    tensors = {"x": 1032, "w": 776, "y": 1032, "xf": 562, "wf": 562}
    graph = {"graph": {"tensors": {k: {"data_type": v} for k, v in tensors.items()},
                       "nodes": {"a": {"type": "FullyConnected", "input_names": ["x", "L0:w_q_transpose"],
                                       "output_names": ["y"]},
                                 "b": {"type": "FullyConnected", "input_names": ["xf", "L1:w_q"],
                                       "output_names": ["y"]}}}}  # fmt: skip
    graph["graph"]["tensors"]["L0:w_q_transpose"] = {"data_type": 776}
    graph["graph"]["tensors"]["L1:w_q"] = {"data_type": 776}
    ids = {"a.to_q": "L0", "a.to_k": "L1", "a.to_v": "L2"}
    integer, float_ = qnn_run.compiled_kernels(graph, list(ids), ids)
    assert integer == ["a.to_q"]
    assert float_ == ["a.to_k", "a.to_v"]  # a float activation; no node reads L2's weight


@pytest.mark.skipif(not qnn_run.available(), reason="onnxruntime-qnn is not installed (pip install 'qexport[qnn]')")
def test_an_open_build_is_refused_by_the_backend(tiny_build, tmp_path):
    recipe = recipe_of("bits.activations=16", "smoothquant.mode=asq", "target=ort-cpu")
    built = build(tiny_build.folder.parent / "s.qstats", tmp_path / "cpu", BuildConfig(recipe=recipe), model=TRUSTED)
    with pytest.raises(QexportError, match="does not run on the HTP backend"):
        qnn_run.htp_session(built.folder / "step_00.onnx", get_profile("qnn-htp"))


@pytest.mark.skipif(not qnn_run.available(), reason="onnxruntime-qnn is not installed (pip install 'qexport[qnn]')")
def per_model_contexts(build_folder, tmp_path):
    """A copy of the build with `qexport contexts --mode per-model` run on it, and its manifest's
    contexts entry, checked: loaded back, outputs equal to the compiling session's."""
    import shutil

    from click.testing import CliRunner

    from qexport.cli import cli

    folder = tmp_path / "b"
    shutil.copytree(build_folder, folder)
    result = CliRunner().invoke(cli, ["contexts", str(folder), "--mode", "per-model"])
    assert result.exit_code == 0, result.output
    entry = json.loads((folder / "manifest.json").read_text())["contexts"]
    assert entry["loaded"] is True and set(entry["max_abs_diff"].values()) == {0.0}  # the same compiled graph
    return folder, entry


def test_context_binaries_load_and_run_the_edge_loop(tiny_build, tmp_path):

    from click.testing import CliRunner
    from qexport.exporter.manifest import write_manifest

    from qexport.cli import cli
    from qexport.runtime.conditioning import Conditioning
    from qexport.runtime.loop import Pipeline
    from qexport.runtime.qnn import model_opener

    folder, entry = per_model_contexts(tiny_build.folder, tmp_path)
    runner = CliRunner()
    assert len(entry["binaries"]) == len(entry["models"]) == 2

    def loop(on_htp: bool) -> np.ndarray:
        manifest = json.loads((folder / "manifest.json").read_text())
        conditioning = Conditioning(folder, manifest)
        opener = model_opener(folder, manifest) if on_htp else None
        pipeline = Pipeline(folder, manifest=manifest, open_model=opener)
        return pipeline.run(conditioning.encode("a red circle moving left"), conditioning.null(), 0).latents

    from_contexts = loop(True)
    manifest = json.loads((folder / "manifest.json").read_text())
    saved = manifest.pop("contexts")
    write_manifest(folder, manifest)  # resealed
    compiled = loop(True)  # each step model compiled at load
    np.testing.assert_array_equal(from_contexts, compiled)
    assert cosine(from_contexts, loop(False)) >= 0.999  # and the loop on HTP agrees with onnxruntime CPU
    manifest["contexts"] = saved
    write_manifest(folder, manifest)  # resealed

    per_model = sum(entry["binaries"].values())
    shared = runner.invoke(cli, ["contexts", str(folder), "--mode", "shared", "--force"])
    entry = json.loads((folder / "manifest.json").read_text())["contexts"]
    assert len(entry["binaries"]) == 1 and sum(entry["binaries"].values()) < per_model
    # loading a multi-graph binary crashes this x86-64 simulator (signal 11): a clean error, never a dead qexport
    assert shared.exit_code == (0 if entry["loaded"] is True else 1), shared.output
    if entry["loaded"] is not True:
        assert "load check" in str(shared.exception)
        manifest = json.loads((folder / "manifest.json").read_text())
        with pytest.raises(QexportError, match="did not load here"):
            model_opener(folder, manifest)


@pytest.mark.skipif(not qnn_run.available(), reason="onnxruntime-qnn is not installed (pip install 'qexport[qnn]')")
@pytest.mark.parametrize("preset", ["qnn-w8a16", "qnn-w4a16"])
def test_the_qnn_presets_run_fixed_point_on_htp(tiny_build, tmp_path, preset):
    from qexport.recipe import load_recipe

    config = BuildConfig(recipe=load_recipe(preset))
    built = build(tiny_build.folder.parent / "s.qstats", tmp_path / preset, config, model=TRUSTED)
    manifest = json.loads((built.folder / "manifest.json").read_text())
    assert manifest["target"] == "qnn-htp" and manifest["quantization"]["a_bits"] == 16
    ids = manifest["layer_ids"]
    path = built.folder / "step_00.onnx"
    cpu = cpu_session(str(path))
    rng = np.random.default_rng(0)
    feeds = {i.name: rng.standard_normal(i.shape).astype(np.float32) for i in cpu.get_inputs()}
    htp = qnn_run.run_htp(path, feeds, list(ids), ids, get_profile("qnn-htp"))
    assert len(htp.integer) == len(ids) and not htp.float_  # every linear fixed-point (int4 weights too)
    assert cosine(htp.output, cpu.run(None, feeds)[0]) >= 0.999
