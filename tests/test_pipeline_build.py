"""A quantized build of a real pipeline: calibrated through the pipeline's own __call__, its bound
transformer planned and emitted as one W8A8 QDQ model per step, shipped with its text parts, VAE
and scheduler block, and verified: integer kernels for every quantized linear, each step model
against the torch simulation on the inputs the edge loop feeds it, and the whole quantized edge
loop against the FP one from the same noise."""

import json
from dataclasses import replace

import numpy as np
import pytest
from click.testing import CliRunner

pytest.importorskip("transformers", minversion="5", reason="the tiny pipelines need transformers>=5")

from pipelines import FAMILIES, call_kwargs
from qexport.calib.pipeline import PipelineCalibConfig, calibrate_pipeline
from qexport.calib.store import save
from qexport.exporter.built import BuildConfig
from qexport.exporter.pipeline_build import build_pipeline, replan_pipeline
from qexport.targets.catalog import get_profile
from qexport.verification.pipeline_verify import verify_pipeline

from qexport.cli import cli
from qexport.errors import QexportError
from qexport.models.registry import ModelRequest
from qexport.recipe import load_recipe
from qexport.runtime.pipeline_loop import PipelineLoop

STEPS = 3
OWN = ("prompt", "negative_prompt", "class_labels", "num_inference_steps", "generator", "output_type")
PROMPTS = ("a red circle", "a blue square")
LABELS = ("1", "7")  # a class-conditional pipeline's (DiT's) calibration "prompts": class ids
TRUSTED = ModelRequest(trust_model_path=True)  # the statistics name the folder each test made


def _call(family):
    call = {k: v for k, v in call_kwargs(family).items() if k not in OWN}
    return {**call, "mask_feature": False} if family == "latte" else call  # fixed-length captions


def _calibrated(tmp_path, family):
    folder = FAMILIES[family](tmp_path / "src")
    call = _call(family)
    prompts = LABELS if family == "dit" else PROMPTS
    result = calibrate_pipeline(folder, PipelineCalibConfig(prompts=prompts, steps=STEPS, call=call))
    save(result.stats, tmp_path / "run.qstats")
    return folder, tmp_path / "run.qstats"


SLOW = pytest.mark.slow  # the same path on more families: CI's slow run


@pytest.mark.parametrize(
    "family",
    ["pixart-alpha", "flux", "sd3", "wan2.1", "dit", *(pytest.param(f, marks=SLOW)
                                                for f in ("pixart-sigma", "latte", "cogvideox", "ltx-video"))],
)  # fmt: skip
def test_a_w8a8_timestep_wise_pipeline_build_verifies(tmp_path, family):
    _, stats = _calibrated(tmp_path, family)
    built = build_pipeline(stats, tmp_path / "build", BuildConfig(recipe=load_recipe("w8a8-tsq-tsw")), model=TRUSTED)
    parts = built.manifest["pipeline"]
    assert {t["precision"] for t in parts["text"]} | {parts["vae"]["precision"]} == {"fp16"}  # the default
    m = built.manifest
    assert [s["model"] for s in m["steps"]] == [f"step_{i:02d}.onnx" for i in range(STEPS)]
    assert m["pipeline"]["denoiser"] is None and m["pipeline"]["vae"]
    assert m["pipeline"]["text"] or m["pipeline"]["labels"]  # DiT: class ids, no text part
    condition, other = ("3", "5") if family == "dit" else ("a green triangle", "a cat")  # not calibrated with
    plans = [r.plan for r in built.ranges]
    v = verify_pipeline(built.folder, built.adapter, plans, m, get_profile(m["target"]), condition)
    layers = len(built.stats.layers)
    for check in v.models:  # every quantized linear of every step model on an integer kernel
        assert len(check.integer) == layers and not check.float_, (check.model, check.float_)
    assert v.ok, [(c.model, c.cosine_sim, c.max_lsb_sim, c.lsb_bound) for c in v.models]
    # W8A8 of a random-weight model, 3-4 steps: measured 22 (SD3) to 55 dB (LTX) on the final latents;
    # 15 dB is below that spread and far above a broken loop's
    assert v.end_to_end["sqnr_latents_db"] > 15.0, v.end_to_end
    # the edge loop of the quantized build runs from text to pixels
    start = np.random.default_rng(0).standard_normal((1, *m["latent_shape"])).astype(np.float32)
    _, images = PipelineLoop(built.folder, m).run(other, start)
    assert images is not None and np.isfinite(images).all() and images.min() >= 0 and images.max() <= 1
    # `qexport verify` re-plans the same models from the statistics
    _, again = replan_pipeline(m, stats, model=TRUSTED)
    for a, b in zip(plans, again, strict=True):
        for layer, lp in a.layers.items():
            assert np.array_equal(lp.w_q, b.layers[layer].w_q) and lp.a_scale == b.layers[layer].a_scale


def test_the_cli_calibrates_builds_runs_and_verifies_a_pipeline(tmp_path):
    folder = FAMILIES["pixart-alpha"](tmp_path / "src")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS))
    call = {k: v for k, v in call_kwargs("pixart-alpha").items() if k not in OWN}
    options = [x for k, v in call.items() for x in ("--call", f"{k}={json.dumps(v)}")]
    runner = CliRunner()
    stats, build = tmp_path / "run.qstats", tmp_path / "build"
    result = runner.invoke(cli, ["calibrate", "--model", f"pipeline:{folder}", "--prompts", str(prompts),
                                 "--steps", str(STEPS), *options, "-o", str(stats)])  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "PixArtAlphaPipeline" in result.output and "DPMSolverMultistepScheduler" in result.output
    asq = ["--set", "smoothquant.mode=asq"]  # the other smoothing mode than the library test's
    parts = ["--set", "parts.precision=int8-weights"]  # the library test builds the default (fp16)
    result = runner.invoke(cli, ["build", str(stats), "--recipe", "w8a8-tsq-tsw", *asq, *parts, "-o", str(build),
                                 "--model", str(folder)])  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "verdict: PASS" in result.output and "latents SQNR" in result.output
    manifest = json.loads((build / "manifest.json").read_text())
    assert manifest["verification"]["ok"] is True
    pipeline = manifest["pipeline"]
    assert {t["precision"] for t in pipeline["text"]} == {pipeline["vae"]["precision"]} == {"int8-weights"}
    result = runner.invoke(cli, ["run", str(build), "--prompt", "a cat", "-o", str(tmp_path / "cat.png")])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "cat.png").stat().st_size > 0
    result = runner.invoke(cli, ["verify", str(build), "--trust-model-path"])
    assert result.exit_code == 0 and "verdict: PASS" in result.output, result.output


def test_pipeline_calibration_refuses_options_of_the_builtin_loop(tmp_path):
    result = CliRunner().invoke(cli, ["calibrate", "--model", f"pipeline:{tmp_path}", "--labels", "a",
                                      "--cfg", "3", "-o", str(tmp_path / "x.qstats")])  # fmt: skip
    assert isinstance(result.exception, QexportError)
    assert str(result.exception) == "--cfg does not apply to a pipeline's own loop; set its arguments with --call"


def test_a_recipe_that_replays_prompts_is_refused_before_anything_is_written(tmp_path):
    _, stats = _calibrated(tmp_path, "pixart-alpha")
    recipe = load_recipe("w8a8-asq-tsw")  # GPTQ and the range search replay prompts
    assert recipe.replaying(), "the preset is expected to replay prompts (searches)"
    with pytest.raises(QexportError, match="is not available for pipeline builds yet"):
        build_pipeline(stats, tmp_path / "build", BuildConfig(recipe=recipe))
    assert not (tmp_path / "build").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".build")] == []


def test_a_target_that_closes_linears_is_refused_before_anything_is_written(tmp_path):
    _, stats = _calibrated(tmp_path, "pixart-alpha")
    recipe = load_recipe("w8a8-tsq-tsw")
    with pytest.raises(QexportError, match="target qnn-htp closes every quantized linear"):
        build_pipeline(stats, tmp_path / "build", BuildConfig(recipe=replace(recipe, target="qnn-htp")))
    assert not (tmp_path / "build").exists()


def test_the_folder_the_statistics_name_is_loaded_only_with_consent(tmp_path):
    folder, stats = _calibrated(tmp_path, "pixart-alpha")
    with pytest.raises(QexportError) as refused:
        build_pipeline(stats, tmp_path / "build", BuildConfig(recipe=load_recipe("w8a8-tsq-tsw")))
    named = folder.resolve()
    assert str(refused.value) == (
        f"{stats} names the model folder {named} (calibrated there); pass --model {named} to load it, "
        "or --trust-model-path"
    )
    assert not (tmp_path / "build").exists()


def test_a_condition_the_pipeline_does_not_take_is_refused_before_anything_is_written(tmp_path):
    folder, stats = _calibrated(tmp_path, "dit")
    request = ModelRequest(model=str(folder), conditions=("a cat",))  # a caption for a class-conditional pipeline
    refused = r"^class label 'a cat' is not known to DiTPipeline; give .*a class id in 0\.\."
    with pytest.raises(QexportError, match=refused):
        build_pipeline(stats, tmp_path / "build", BuildConfig(recipe=load_recipe("w8a8-tsq-tsw")), model=request)
    assert not (tmp_path / "build").exists()


def test_statistics_of_another_pipeline_are_refused(tmp_path):
    folder, stats = _calibrated(tmp_path, "pixart-alpha")
    config = json.loads((folder / "transformer" / "config.json").read_text())
    config["norm_eps"] = 2e-6  # the same folder, another transformer config
    (folder / "transformer" / "config.json").write_text(json.dumps(config))
    with pytest.raises(QexportError, match=r"calibrate .* first"):
        build_pipeline(stats, tmp_path / "build", BuildConfig(recipe=load_recipe("w8a8-tsq-tsw")), model=TRUSTED)
    assert not (tmp_path / "build").exists()
