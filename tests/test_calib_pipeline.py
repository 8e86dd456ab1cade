"""Calibration through a real pipeline's own __call__: every chosen linear gets statistics for
every step, each step counts exactly the transformer inputs the pipeline fed it (CFG doubles the
batch; Flux has none), the hooks leave the pipeline's result unchanged, and the header carries the
scheduler block the build will use (probed from the folder's scheduler, checked) and the
transformer's keyword inputs."""

import json

import numpy as np
import pytest
import torch

pytest.importorskip("transformers", minversion="5", reason="the tiny pipelines need transformers>=5")

from pipelines import FAMILIES, call_kwargs
from qexport.calib.pipeline import PipelineCalibConfig, calibrate_pipeline
from qexport.calib.store import load, save

from qexport.errors import QexportError
from qexport.models.pipeline import load_pipeline, starting_from, trace_call

STEPS = 3
PROMPTS = ("a red circle", "a blue square")
LABELS = ("1", "7")
TAKEN = ("prompt", "num_inference_steps", "generator", "output_type", "class_labels", "negative_prompt")


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("pipelines")
    return {name: make(root) for name, make in FAMILIES.items()}


@pytest.mark.parametrize("family", list(FAMILIES))
def test_pipeline_calibration_counts_every_call_of_every_step(folders, family, tmp_path):
    if family == "wan2.1":
        pytest.importorskip("accelerate", reason="diffusers loads WanTransformer3DModel only with accelerate")
    call = {k: v for k, v in call_kwargs(family).items() if k not in TAKEN}
    if family == "latte":
        call["mask_feature"] = False  # caption embeddings at their padded length (refused otherwise, below)
    prompts = LABELS if family == "dit" else PROMPTS  # DiT is class-conditional: class ids
    config = PipelineCalibConfig(prompts=prompts, seeds=(0,), steps=STEPS, call=call)
    result = calibrate_pipeline(folders[family], config)
    stats, header = result.stats, result.stats.header
    assert result.hooked == len(stats.layers) > 0 and header["steps"] == STEPS
    calls = header["transformer_calls"]
    batch = calls[0]["tensors"].get("hidden_states", calls[0]["tensors"].get("arg0"))["shape"][0]
    # CFG as one batch of cond + uncond; Wan calls the transformer twice per step (cond, then uncond);
    # Flux has no CFG (guidance is embedded)
    assert (len(calls), batch) == {"flux": (1, 1), "wan2.1": (2, 1)}.get(family, (1, 2))
    tokens = {name: s.count for name, s in stats.layers.items()}
    for name, count in tokens.items():  # every step saw both prompts' calls: the same count per step
        assert count.shape == (STEPS,) and np.all(count > 0) and np.all(count == count[0]), (name, count)
    assert header["scheduler"]["class"] == type(load_pipeline(folders[family]).scheduler).__name__
    assert len(header["scheduler"]["steps"]) == STEPS
    save(stats, tmp_path / "run.qstats")  # the header is plain data
    again = load(tmp_path / "run.qstats")
    assert again.header["scheduler"] == header["scheduler"] and list(again.layers) == list(stats.layers)

    # the calibrated trajectory is the pipeline's own from the edge loop's noise (numpy, from the seed),
    # and the hooks did not change what the pipeline computes
    pipe = load_pipeline(folders[family])
    final = result.finals[-1]
    noise = torch.from_numpy(np.random.default_rng(0).standard_normal((1, *final.shape[1:]), dtype=np.float32))
    condition = {"class_labels": [int(LABELS[-1])]} if family == "dit" else {"prompt": PROMPTS[-1]}
    with starting_from(pipe, noise) as start:  # latents=, or DiT's own draw of its noise replaced
        plain = trace_call(pipe, **condition, num_inference_steps=STEPS, output_type="latent",
                           generator=torch.Generator("cpu").manual_seed(0), **start, **call)  # fmt: skip
    want = plain.results[-1]  # the last scheduler step's result (DiT steps its whole CFG batch)
    assert want.shape == final.shape
    assert np.linalg.norm(final - want) <= 1e-5 * np.linalg.norm(want), np.linalg.norm(final - want)


def test_pipeline_calibration_refuses_arguments_it_sets_and_bad_patterns(folders):
    with pytest.raises(QexportError, match="pipeline argument 'generator' is set by calibration itself"):
        PipelineCalibConfig(prompts=PROMPTS, call={"generator": None})
    config = PipelineCalibConfig(prompts=PROMPTS, steps=2, include=("nothing.*",))
    with pytest.raises(QexportError, match=r"layer pattern 'nothing\.\*' matches no linear layer"):
        calibrate_pipeline(folders["pixart-alpha"], config)


def test_pipeline_calibration_refuses_a_long_prompt_and_an_unsupported_scheduler_before_sampling(
    folders, tmp_path, monkeypatch
):
    call = {k: v for k, v in call_kwargs("pixart-alpha").items() if k not in TAKEN}
    long = " ".join(["red circle"] * 40)  # far over the tiny folder's max_sequence_length
    sampled = []
    monkeypatch.setattr("qexport.calib.pipeline.trace_call", lambda *a, **k: sampled.append(1))
    with pytest.raises(QexportError, match=r"tokens for tokenizer, which takes 16; shorten it or raise --call"):
        calibrate_pipeline(folders["pixart-alpha"], PipelineCalibConfig(prompts=(long,), steps=2, call=call))
    import shutil

    folder = shutil.copytree(folders["pixart-alpha"], tmp_path / "pixart")
    index = json.loads((folder / "model_index.json").read_text())
    index["scheduler"] = ["diffusers", "HeunDiscreteScheduler"]  # second order: two model calls per step
    (folder / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(QexportError, match="scheduler HeunDiscreteScheduler is not supported at the edge"):
        calibrate_pipeline(folder, PipelineCalibConfig(prompts=PROMPTS, steps=2, call=call))
    assert not sampled  # refused before any sampling


def test_a_call_that_cuts_captions_to_the_prompt_is_refused_before_sampling(folders, monkeypatch):
    call = {k: v for k, v in call_kwargs("latte").items() if k not in TAKEN}  # mask_feature left at True
    sampled = []
    monkeypatch.setattr("qexport.calib.pipeline.trace_call", lambda *a, **k: sampled.append(1))
    with pytest.raises(QexportError, match=r"LattePipeline cuts its caption embeddings .* --call mask_feature=false"):
        calibrate_pipeline(folders["latte"], PipelineCalibConfig(prompts=PROMPTS, steps=2, call=call))
    assert not sampled


def test_a_class_conditional_pipeline_refuses_an_unknown_label(folders):
    with pytest.raises(QexportError, match=r"class label 'a red circle' is not known to DiTPipeline; give a class id"):
        calibrate_pipeline(folders["dit"], PipelineCalibConfig(prompts=("a red circle",), steps=2))


def test_a_transformer_without_a_family_entry_calibrates_through_the_generic_one(folders, monkeypatch):
    from qexport.models import families

    monkeypatch.delitem(families.FAMILIES, "PixArtTransformer2DModel")  # as if PixArt were not registered
    call = {k: v for k, v in call_kwargs("pixart-alpha").items() if k not in TAKEN}
    result = calibrate_pipeline(folders["pixart-alpha"], PipelineCalibConfig(prompts=PROMPTS, steps=2, call=call))
    assert result.hooked == 20 and all(n.startswith("transformer_blocks.") for n in result.stats.layers)


def test_a_transformer_that_is_no_standard_dit_is_refused_naming_what_is_missing():
    from qexport.models.families import family_for

    class Mixer(torch.nn.Module):  # linears, but no diffusers Attention and no blocks
        def __init__(self):
            super().__init__()
            self.proj = torch.nn.Linear(4, 4)

    with pytest.raises(QexportError, match=r"'Mixer' has no family entry .*no diffusers Attention .*no linear under"):
        family_for(Mixer())
