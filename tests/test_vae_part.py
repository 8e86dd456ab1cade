"""A pipeline's VAE decoder shipped for the edge, image VAEs and the 3-D video VAEs alike: from the
latents the pipeline's scheduler left at its last step, the FP32 ONNX decoder and the numpy pre- and
postprocessing give the pipeline's own decoded output; what it cannot decode is refused in one line."""

import json

import diffusers
import numpy as np
import onnx
import pytest
import torch

pytest.importorskip("transformers", minversion="5", reason="the tiny pipelines need transformers>=5")

from pipelines import FAMILIES, call_kwargs
from qexport.exporter.vae import export_vae_decoder, latent_grid

from qexport.errors import QexportError
from qexport.models.pipeline import load_pipeline, trace_call
from qexport.recipe import PartPrecision
from qexport.runtime.vae import VaeDecoder


def _first(result):
    return result[0] if isinstance(result, tuple) else next(iter(result.values()))


def _statistics(vae):
    """Per-channel latents_mean / latents_std and a scaling factor other than LTX's defaults (0, 1, 1)."""
    generator = torch.Generator().manual_seed(1)
    vae.latents_mean.copy_(torch.randn(vae.latents_mean.shape, generator=generator) * 0.5)
    vae.latents_std.copy_(torch.rand(vae.latents_std.shape, generator=generator) + 0.5)
    vae.register_to_config(scaling_factor=0.8)


@pytest.mark.parametrize("family", ["dit", "pixart-alpha", "sd3", "flux", "latte", "wan2.1", "cogvideox", "ltx-video"])
def test_the_edge_decoder_gives_the_pipelines_own_output(tmp_path, family):
    if family == "wan2.1":
        pytest.importorskip("accelerate", reason="diffusers loads WanTransformer3DModel only with accelerate")
    pipe = load_pipeline(FAMILIES[family](tmp_path / "src"))
    if family == "ltx-video":  # its tiny VAE keeps the identity statistics; checked with others
        _statistics(pipe.vae)
    trace = trace_call(pipe, **call_kwargs(family))  # decoded as the pipeline decodes (output_type "np")
    pixels = np.asarray(_first(trace.output))  # [1, h, w, 3] images, or [1, F, h, w, 3] a video's frames
    # the last step's sample (DiT: CFG's first half); a video's packed latents (LTX) with their grid
    latents = torch.from_numpy(trace.results[-1][:1].astype(np.float32))
    grid = latent_grid(trace.calls[0].values)  # the precisions other than FP32: test_part_precision.py
    spec = export_vae_decoder(pipe, latents, tmp_path, grid=grid, precision=PartPrecision.FP32)
    assert spec["precision"] == "fp32"
    onnx.checker.check_model(str(tmp_path / spec["model"]))
    assert json.loads(json.dumps(spec)) == spec  # every number the edge needs is data
    got = VaeDecoder(tmp_path, spec).images(latents.numpy())
    want = pixels.reshape(-1, *pixels.shape[-3:])  # [N, h, w, 3]: one image, or a video's frames
    assert got.shape == want.shape
    assert np.linalg.norm(got - want) <= 1e-3 * np.linalg.norm(want), np.linalg.norm(got - want) / np.linalg.norm(want)


def test_a_vae_class_without_a_decoding_rule_is_refused_by_class(tmp_path):
    pipe = load_pipeline(FAMILIES["dit"](tmp_path / "src"))
    pipe.vae = diffusers.AutoencoderTiny()  # a VAE a user may swap in; DiT's pipeline decodes AutoencoderKL
    with pytest.raises(QexportError, match="DiTPipeline with AutoencoderTiny has no VAE export yet; supported: "):
        export_vae_decoder(pipe, torch.zeros(1, 4, 4, 4), tmp_path)
    assert not (tmp_path / "vae_decoder.onnx").exists()


def test_a_timestep_conditioned_ltx_vae_is_refused_by_its_config_key(tmp_path):
    pipe = load_pipeline(FAMILIES["ltx-video"](tmp_path / "src"))
    pipe.vae.register_to_config(timestep_conditioning=True)  # LTX-Video 0.9.1 and later: decoding adds noise
    with pytest.raises(QexportError, match="LTXPipeline's vae sets timestep_conditioning=True"):
        export_vae_decoder(pipe, torch.zeros(1, 128, 8), tmp_path, grid=(2, 8, 8))


def test_packed_video_latents_without_their_grid_are_refused(tmp_path):
    pipe = load_pipeline(FAMILIES["ltx-video"](tmp_path / "src"))
    with pytest.raises(QexportError, match=r"LTXPipeline's packed latents \[1, 128, 8\] need their latent grid"):
        export_vae_decoder(pipe, torch.zeros(1, 128, 8), tmp_path)
