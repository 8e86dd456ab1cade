"""The built-in models sample through one loop, their pipeline (QexportPipeline): calibrating by
name and calibrating the folder as a pipeline give the same statistics, and both equal the
committed calibrations the regression builds start from (made by the loop before it became a
pipeline)."""

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from qexport.calib.pipeline import PipelineCalibConfig, calibrate_pipeline
from qexport.calib.run import CalibConfig, calibrate
from qexport.calib.stats import LayerStats
from qexport.calib.store import load

from qexport.errors import QexportError
from qexport.models.builtin_pipeline import QexportLabelPipeline, QexportPipeline
from qexport.models.pipeline import load_pipeline
from qexport.models.registry import BUILTIN_DIR, load_model
from qexport.models.sampler import SamplingConfig

HERE = Path(__file__).parent / "fixtures" / "regression"
_spec = importlib.util.spec_from_file_location("make_expected", HERE / "make_expected.py")
assert _spec is not None and _spec.loader is not None
make_expected = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(make_expected)


def _arrays(stats: LayerStats) -> dict[str, np.ndarray]:
    return {k: v for k, v in vars(stats).items() if isinstance(v, np.ndarray)}


def _compare(a: dict[str, LayerStats], b: dict[str, LayerStats], rtol: float) -> int:
    """Every array of every layer equal within rtol of its largest magnitude; returns how many."""
    assert sorted(a) == sorted(b)
    n = 0
    for name in a:
        assert a[name].asq_n == b[name].asq_n, name
        for key, x in _arrays(a[name]).items():
            y = _arrays(b[name])[key]
            assert x.shape == y.shape, (name, key)
            scale = max(float(np.abs(x).max()), 1e-30)
            assert np.abs(x.astype(np.float64) - y).max() <= rtol * scale, (name, key)
            n += 1
    return n


@pytest.mark.parametrize("key", ["latte", "dit"])
def test_calibration_through_the_pipeline_equals_the_committed_one(key: str) -> None:
    model, prompts = make_expected.CALIBRATION[key]
    committed = load(make_expected.STATS[key])
    config = CalibConfig(prompts=prompts, sampling=SamplingConfig(steps=4, cfg=7.0), batch_size=2)
    fresh = calibrate(load_model(model), config).stats
    # bit-identical where the fixture was made; elsewhere float sums differ in their last bits
    # (measured: float32 extremes move by a few 1e-7 of their scale across CPUs / BLAS)
    rtol = 0.0 if make_expected.environment() == json.loads(make_expected.EXPECTED.read_text())["environment"] else 1e-5
    assert _compare(committed.layers, fresh.layers, rtol) > 100
    assert fresh.header["timesteps"] == committed.header["timesteps"]


BUILTIN_PROMPTS = [("tiny-dit", ("red circle", "3")), ("tiny-latte", ("a red circle moving left", "a blue square"))]


@pytest.mark.parametrize(("name", "prompts"), BUILTIN_PROMPTS)
def test_by_name_and_as_a_pipeline_give_the_same_statistics(name: str, prompts: tuple[str, ...]) -> None:
    by_name = calibrate(load_model(name), CalibConfig(prompts=prompts, sampling=SamplingConfig(steps=3), batch_size=1))
    piped = calibrate_pipeline(BUILTIN_DIR / name, PipelineCalibConfig(prompts=prompts, steps=3))
    assert piped.stats.header["pipeline"] in ("QexportPipeline", "QexportLabelPipeline")
    assert piped.stats.header["scheduler"]["class"] == "DDIMScheduler"
    assert [int(t) for t in piped.stats.header["timesteps"]] == by_name.stats.header["timesteps"]
    assert _compare(by_name.stats.layers, piped.stats.layers, 0.0) > 100  # the same loop, the same machine


def test_folder_loads_as_its_pipeline_and_samples_from_given_latents() -> None:
    pipe = load_pipeline(BUILTIN_DIR / "tiny-dit")
    assert isinstance(pipe, QexportLabelPipeline)
    assert pipe.labels["red circle"] == 0
    x = torch.randn(2, *pipe.model.latent_shape, generator=torch.Generator().manual_seed(0))
    latents = pipe(class_labels=["red circle", 4], num_inference_steps=2, latents=x, output_type="latent").images
    again = pipe(class_labels=["red circle", 4], num_inference_steps=2, latents=x, output_type="latent").images
    assert latents.shape == x.shape and torch.equal(latents, again)
    pixels = pipe(class_labels="blue square", num_inference_steps=2, latents=x[:1]).images
    assert pixels.dtype == np.uint8 and pixels.shape == (1, 32, 32, 3)
    assert isinstance(load_pipeline(BUILTIN_DIR / "tiny-latte"), QexportPipeline)


def test_bad_calls_are_one_clear_error() -> None:
    pipe = load_pipeline(BUILTIN_DIR / "tiny-latte")
    with pytest.raises(QexportError, match="prompt or prompt_embeds"):
        pipe(num_inference_steps=2)
    with pytest.raises(QexportError, match="latents must be"):
        pipe(prompt="a red circle moving left", num_inference_steps=2, latents=torch.zeros(1, 3, 8, 8))
    with pytest.raises(QexportError, match="unknown word"):
        pipe(prompt="a purple hexagon", num_inference_steps=2)
    with pytest.raises(QexportError, match="has no model"):
        QexportPipeline(pipe.transformer, pipe.scheduler)(prompt="a red circle", num_inference_steps=1)
