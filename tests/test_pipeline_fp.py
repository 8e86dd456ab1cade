"""An FP build of a real pipeline runs at the edge from text (or a class label) to pixels: its
transformer inputs bound to the latents, timestep, text parts, class label and constants by value,
its output rule (learned-sigma split, CFG) checked, and the edge loop (tokenizers, text parts,
transformer, scheduler block, VAE) gives the pipeline's own decoded output from the same first
sample."""

import json

import numpy as np
import pytest
import torch

pytest.importorskip("transformers", minversion="5", reason="the tiny pipelines need transformers>=5")

from pipelines import FAMILIES, PROMPT, call_kwargs
from qexport.exporter.pipeline_parts import export_fp_pipeline

from qexport.errors import QexportError
from qexport.models.pipeline import load_pipeline, starting_from, trace_call
from qexport.runtime.pipeline_loop import PipelineLoop

STEPS = 3
OWN = ("prompt", "class_labels", "num_inference_steps", "generator", "output_type")
FIXED = {"latte": {"mask_feature": False}}  # what the refusals name: caption embeddings kept at their padded length


@pytest.mark.parametrize(
    "family", ["pixart-alpha", "pixart-sigma", "latte", "sd3", "flux", "cogvideox", "ltx-video", "wan2.1"]
)
def test_the_fp_edge_loop_gives_the_pipelines_own_pixels(tmp_path, family):
    if family == "wan2.1":
        pytest.importorskip("accelerate", reason="diffusers loads WanTransformer3DModel only with accelerate")
    folder = FAMILIES[family](tmp_path / "src")
    call = {**{k: v for k, v in call_kwargs(family).items() if k not in OWN}, **FIXED.get(family, {})}
    manifest = export_fp_pipeline(folder, tmp_path / "build", PROMPT, STEPS, call)
    pipe = load_pipeline(folder)
    other = "a burger eating a painting"  # not the prompt the build traced: the bindings generalise
    trace = trace_call(pipe, prompt=other, num_inference_steps=STEPS, output_type="np",
                       generator=torch.Generator("cpu").manual_seed(0), **call)  # fmt: skip
    want = np.asarray(trace.output[0] if isinstance(trace.output, tuple) else next(iter(trace.output.values())))
    latents, images = PipelineLoop(tmp_path / "build", manifest).run(other, trace.samples[0].astype(np.float32))
    ref = trace.results[-1]
    assert np.linalg.norm(latents - ref) <= 1e-4 * np.linalg.norm(ref), np.linalg.norm(latents - ref) / np.linalg.norm(
        ref
    )
    assert images is not None
    want = want.reshape(images.shape)
    assert np.linalg.norm(images - want) <= 1e-3 * np.linalg.norm(want), np.linalg.norm(images - want) / np.linalg.norm(
        want
    )
    sources = {i["source"] for c in manifest["pipeline"]["calls"] for i in c["inputs"]}
    assert {"latents", "timestep"} <= sources and sources & {"text", "joined"}


def _relative(got, want):
    return float(np.linalg.norm(got - want) / np.linalg.norm(want))


def test_the_fp_edge_loop_gives_dits_own_pixels_for_another_class(tmp_path):
    folder = FAMILIES["dit"](tmp_path / "src")
    index = json.loads((folder / "model_index.json").read_text())
    index["id2label"] = {"1": "goldfish", "7": "tabby, tabby cat"}  # as a real DiT folder names its classes
    (folder / "model_index.json").write_text(json.dumps(index))
    call = {k: v for k, v in call_kwargs("dit").items() if k not in OWN}
    manifest = export_fp_pipeline(folder, tmp_path / "build", "goldfish", STEPS, call)
    p = manifest["pipeline"]
    assert p["labels"] == {"names": {"goldfish": 1, "tabby": 7, "tabby cat": 7}, "classes": 1000, "null": 1000}
    bound = {i["name"]: i for i in p["calls"][0]["inputs"]}
    assert bound["class_labels"]["source"] == "label" and bound["class_labels"]["order"] == "cond,uncond"
    assert bound["arg0"]["repeat"] == 2 and p["split"] == 4 and p["cfg"] == "cond,uncond"  # one sample, CFG batch
    pipe = load_pipeline(folder)
    noise = np.random.default_rng(3).standard_normal((1, *manifest["latent_shape"])).astype(np.float32)
    with starting_from(pipe, torch.from_numpy(noise)) as given:  # DiT draws its noise itself
        trace = trace_call(pipe, class_labels=[7], num_inference_steps=STEPS, output_type="np",
                           generator=torch.Generator("cpu").manual_seed(0), **call, **given)  # fmt: skip
    loop = PipelineLoop(tmp_path / "build", manifest)
    latents, images = loop.run("tabby", noise)  # not the class the build traced
    assert _relative(latents, trace.results[-1][:1]) <= 1e-4, _relative(latents, trace.results[-1][:1])
    assert images is not None
    want = np.asarray(trace.output.images).reshape(images.shape)
    assert _relative(images, want) <= 1e-3, _relative(images, want)
    assert np.array_equal(loop.run(7, noise)[0], latents)  # the id, as the name
    with pytest.raises(QexportError, match=r"class label 'zebra' is not known to this build; give one of goldfish"):
        loop.run("zebra", noise)
    from click.testing import CliRunner

    from qexport.cli import cli

    png, runner = tmp_path / "tabby.png", CliRunner()
    ran = runner.invoke(cli, ["run", str(tmp_path / "build"), "--label", "tabby", "-o", str(png)])
    assert ran.exit_code == 0 and png.stat().st_size > 0, ran.output
    wrong = runner.invoke(cli, ["run", str(tmp_path / "build"), "--prompt", "a cat", "-o", str(png)])
    assert str(wrong.exception) == (
        "this build takes a class label: pass --label (a class id or a name of its id2label), not --prompt"
    )


def test_a_pipeline_whose_inputs_cannot_be_bound_is_refused_by_input_name(tmp_path, monkeypatch):
    import diffusers

    own = diffusers.PixArtSigmaPipeline.encode_prompt

    def noisy(self, *args, **kwargs):  # caption embeddings no text part reproduces
        embeds, *rest = own(self, *args, **kwargs)
        return (embeds + torch.randn_like(embeds), *rest)

    monkeypatch.setattr(diffusers.PixArtSigmaPipeline, "encode_prompt", noisy)
    folder = FAMILIES["pixart-sigma"](tmp_path / "src")
    call = {k: v for k, v in call_kwargs("pixart-sigma").items() if k not in OWN}
    with pytest.raises(QexportError, match=r"transformer input 'encoder_hidden_states' .* needs its own binding"):
        export_fp_pipeline(folder, tmp_path / "build", PROMPT, STEPS, call)
    assert not (tmp_path / "build").exists()  # refused before anything is written


@pytest.mark.parametrize(
    ("family", "message"),
    [
        ("dit", "class label 'a caption' is not known to DiTPipeline; give a class id in 0..999"),
        (
            "latte",
            "LattePipeline's transformer input 'encoder_hidden_states' changes shape with the prompt .*; "
            "call it with --call mask_feature=false",
        ),
    ],
)
def test_calls_the_edge_cannot_follow_are_refused_before_any_work(tmp_path, family, message):
    call = {k: v for k, v in call_kwargs(family).items() if k not in OWN}
    condition = "a caption" if family == "dit" else PROMPT  # DiT is traced with a class label, not a caption
    with pytest.raises(QexportError, match=message):
        export_fp_pipeline(FAMILIES[family](tmp_path / "src"), tmp_path / "build", condition, STEPS, call)
    assert not (tmp_path / "build").exists() and not list(tmp_path.glob(".build.*"))  # no half-written folder


def test_export_fp_and_run_from_the_command_line(tmp_path):
    from click.testing import CliRunner

    from qexport.cli import cli

    folder = FAMILIES["pixart-sigma"](tmp_path / "src")
    runner = CliRunner()
    args = ["export-fp", str(folder), "-o", str(tmp_path / "b"), "--prompt", PROMPT, "--steps", "2", "--call",
            "height=8", "--call", "width=8", "--call", "use_resolution_binning=false", "--call", "clean_caption=false",
            "--call", "max_sequence_length=16"]  # fmt: skip
    done = runner.invoke(cli, args)
    assert done.exit_code == 0, done.output
    assert "PixArtSigmaPipeline: 1 text part(s), transformer inputs " in done.output, done.output[-400:]
    png = tmp_path / "out.png"
    ran = runner.invoke(cli, ["run", str(tmp_path / "b"), "--prompt", "a burger", "-o", str(png)])
    assert ran.exit_code == 0, ran.output
    assert png.is_file() and png.stat().st_size > 0
    missing = runner.invoke(cli, ["run", str(tmp_path / "b"), "-o", str(png)])
    assert missing.exit_code != 0 and "this build takes a caption: pass --prompt" in str(missing.exception)
    labelled = runner.invoke(cli, ["run", str(tmp_path / "b"), "--label", "7", "-o", str(png)])
    assert str(labelled.exception) == "this build takes a caption: pass --prompt, not --label"
    (tmp_path / "b" / "vae_decoder.onnx").unlink()
    broken = runner.invoke(cli, ["run", str(tmp_path / "b"), "--prompt", "a burger", "-o", str(png)])
    assert broken.exit_code != 0 and str(broken.exception).startswith("vae_decoder.onnx named in")


def test_a_timestep_of_zero_at_the_second_step_is_still_the_timestep(tmp_path):
    # DDIM with leading spacing over two steps samples at 500 then 0: the step-1 value is 0, the
    # same multiple (1) of its timestep as 500 is of the first one
    from qexport.exporter.pipeline_parts import bind_pipeline

    folder = FAMILIES["latte"](tmp_path / "src")
    call = {**{k: v for k, v in call_kwargs("latte").items() if k not in OWN}, **FIXED["latte"]}
    binding = bind_pipeline(folder, PROMPT, 2, call)
    assert [s["timestep"] for s in binding.block["steps"]] == [500, 0]
    bound = {i["name"]: i for i in binding.calls[0]["inputs"]}
    assert bound["timestep"]["source"] == "timestep" and bound["timestep"]["factor"] == 1.0
