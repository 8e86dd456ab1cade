"""A pipeline's VAE decoder shipped for the edge: from the latents the pipeline's scheduler left at
its last step, the ONNX decoder and the numpy pre- and postprocessing give the pipeline's own
decoded output."""

import numpy as np
import onnx
import pytest
import torch

pytest.importorskip("transformers", minversion="5", reason="the tiny pipelines need transformers>=5")

from pipelines import FAMILIES, call_kwargs
from qexport.exporter.vae import export_vae_decoder

from qexport.errors import QexportError
from qexport.models.pipeline import load_pipeline, trace_call
from qexport.runtime.vae import VaeDecoder


def _first(result):
    return result[0] if isinstance(result, tuple) else next(iter(result.values()))


@pytest.mark.parametrize("family", ["dit", "pixart-alpha", "sd3", "flux", "latte"])
def test_the_edge_decoder_gives_the_pipelines_own_output(tmp_path, family):
    pipe = load_pipeline(FAMILIES[family](tmp_path / "src"))
    kwargs = call_kwargs(family)
    trace = trace_call(pipe, **kwargs)  # decoded as the pipeline decodes (output_type "np")
    pixels = np.asarray(_first(trace.output))
    latents = torch.from_numpy(
        trace.results[-1][:1].astype(np.float32)
    )  # the last step's sample (DiT: CFG's first half)
    spec = export_vae_decoder(pipe, latents, tmp_path)
    onnx.checker.check_model(str(tmp_path / spec["model"]))
    got = VaeDecoder(tmp_path, spec).images(latents.numpy())
    want = pixels.reshape(got.shape)  # [N, h, w, 3]: one image, or a video's frames
    assert np.linalg.norm(got - want) <= 1e-3 * np.linalg.norm(want), np.linalg.norm(got - want) / np.linalg.norm(want)


def test_video_vaes_are_refused_by_class(tmp_path):
    pytest.importorskip("accelerate", reason="diffusers loads WanTransformer3DModel only with accelerate")
    pipe = load_pipeline(FAMILIES["wan2.1"](tmp_path / "src"))
    with pytest.raises(QexportError, match="WanPipeline with AutoencoderKLWan has no VAE export yet"):
        export_vae_decoder(pipe, torch.zeros(1, 4, 2, 2, 2), tmp_path)
