"""A tiny random Latte (one spatial and one temporal block, patchify and unpatchify included)
built for qnn-htp, opened on Qualcomm's HTP backend (onnxruntime-qnn, simulated on x86-64) with
CPU fallback disabled, and run: it must agree with onnxruntime CPU on the same file."""

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

from qexport.models.registry import load_model
from qexport.models.sampler import SamplingConfig
from qexport.recipe import recipe_of

LATTE = dict(num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8, num_layers=1,
             cross_attention_dim=16, sample_size=8, patch_size=2, norm_type="ada_norm_single",
             num_embeds_ada_norm=1000, caption_channels=16, video_length=2, norm_elementwise_affine=False)  # fmt: skip


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
    return build(root / "s.qstats", root / "out", BuildConfig(recipe=recipe))


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
    rng = np.random.default_rng(0)
    feeds = {i.name: rng.standard_normal(i.shape).astype(np.float32) for i in session.get_inputs()}
    htp = session.run(None, feeds)[0]
    cpu = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, feeds)[0]
    cosine = float(htp.ravel() @ cpu.ravel() / (np.linalg.norm(htp) * np.linalg.norm(cpu)))
    assert cosine >= 0.999, cosine
