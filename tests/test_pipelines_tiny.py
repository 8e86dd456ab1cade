"""The tiny pipeline folders of tests/pipelines.py: each family's folder reloads offline through
``DiffusionPipeline.from_pretrained``, names the family's real classes in model_index.json, is the
same on every build, and generates finite images / videos of the expected shape in 2 steps."""

import json

import numpy as np
import pytest

pytest.importorskip("transformers", minversion="5", reason="the tiny pipelines need transformers>=5")

import diffusers
import huggingface_hub.constants
from pipelines import FAMILIES, PROMPT, WORDS, call_kwargs, clip_tokenizer, t5_tokenizer

T5 = ["transformers", "T5EncoderModel"]
T5_TOK = ["transformers", "T5Tokenizer"]
CLIP_TOK = ["transformers", "CLIPTokenizer"]

# family -> (pipeline class, model_index.json entries, output shape of call_kwargs(family))
EXPECTED: dict[str, tuple[str, dict[str, list[str | None]], tuple[int, ...]]] = {
    "dit": (
        "DiTPipeline",
        {
            "transformer": ["diffusers", "DiTTransformer2DModel"],
            "scheduler": ["diffusers", "DDIMScheduler"],
            "vae": ["diffusers", "AutoencoderKL"],
        },
        (1, 8, 8, 3),
    ),
    "pixart-alpha": (
        "PixArtAlphaPipeline",
        {
            "transformer": ["diffusers", "PixArtTransformer2DModel"],
            "scheduler": ["diffusers", "DPMSolverMultistepScheduler"],
            "text_encoder": T5,
            "tokenizer": T5_TOK,
            "vae": ["diffusers", "AutoencoderKL"],
        },
        (1, 8, 8, 3),
    ),
    "pixart-sigma": (
        "PixArtSigmaPipeline",
        {
            "transformer": ["diffusers", "PixArtTransformer2DModel"],
            "scheduler": ["diffusers", "DPMSolverMultistepScheduler"],
            "text_encoder": T5,
            "tokenizer": T5_TOK,
            "vae": ["diffusers", "AutoencoderKL"],
        },
        (1, 8, 8, 3),
    ),
    "latte": (
        "LattePipeline",
        {
            "transformer": ["diffusers", "LatteTransformer3DModel"],
            "scheduler": ["diffusers", "DDIMScheduler"],
            "text_encoder": T5,
            "tokenizer": T5_TOK,
            "vae": ["diffusers", "AutoencoderKL"],
        },
        (1, 2, 8, 8, 3),
    ),
    "sd3": (
        "StableDiffusion3Pipeline",
        {
            "transformer": ["diffusers", "SD3Transformer2DModel"],
            "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
            "text_encoder": ["transformers", "CLIPTextModelWithProjection"],
            "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
            "text_encoder_3": T5,
            "tokenizer": CLIP_TOK,
            "tokenizer_2": CLIP_TOK,
            "tokenizer_3": T5_TOK,
            "vae": ["diffusers", "AutoencoderKL"],
            "image_encoder": [None, None],
        },
        (1, 8, 8, 3),
    ),
    "flux": (
        "FluxPipeline",
        {
            "transformer": ["diffusers", "FluxTransformer2DModel"],
            "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
            "text_encoder": ["transformers", "CLIPTextModel"],
            "text_encoder_2": T5,
            "tokenizer": CLIP_TOK,
            "tokenizer_2": T5_TOK,
            "vae": ["diffusers", "AutoencoderKL"],
            "image_encoder": [None, None],
        },
        (1, 8, 8, 3),
    ),
    "wan2.1": (
        "WanPipeline",
        {
            "transformer": ["diffusers", "WanTransformer3DModel"],
            "transformer_2": [None, None],
            "scheduler": ["diffusers", "UniPCMultistepScheduler"],
            "text_encoder": ["transformers", "UMT5EncoderModel"],
            "tokenizer": T5_TOK,
            "vae": ["diffusers", "AutoencoderKLWan"],
        },
        (1, 5, 16, 16, 3),
    ),
    "cogvideox": (
        "CogVideoXPipeline",
        {
            "transformer": ["diffusers", "CogVideoXTransformer3DModel"],
            "scheduler": ["diffusers", "CogVideoXDDIMScheduler"],
            "text_encoder": T5,
            "tokenizer": T5_TOK,
            "vae": ["diffusers", "AutoencoderKLCogVideoX"],
        },
        (1, 9, 16, 16, 3),
    ),
    "ltx-video": (
        "LTXPipeline",
        {
            "transformer": ["diffusers", "LTXVideoTransformer3DModel"],
            "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
            "text_encoder": T5,
            "tokenizer": T5_TOK,
            "vae": ["diffusers", "AutoencoderKLLTXVideo"],
        },
        (1, 5, 32, 32, 3),
    ),
}


@pytest.fixture
def offline(monkeypatch):
    """No hub: the environment variable, and the flag huggingface_hub read from it at import."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


def test_every_family_has_expectations():
    assert set(EXPECTED) == set(FAMILIES)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_tiny_pipeline(family, tmp_path, offline):
    if family == "wan2.1":
        # diffusers loads WanTransformer3DModel (it keeps some modules in fp32) only through accelerate
        pytest.importorskip("accelerate", reason="diffusers loads WanTransformer3DModel only with accelerate")
    pipeline_class, components, shape = EXPECTED[family]

    folder = FAMILIES[family](tmp_path / "a")
    again = FAMILIES[family](tmp_path / "b")
    files = sorted(p.relative_to(folder) for p in folder.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(again) for p in again.rglob("*") if p.is_file())
    for name in files:  # seeded: the same weights, configs and tokenizers on every build
        assert (folder / name).read_bytes() == (again / name).read_bytes(), name

    index = json.loads((folder / "model_index.json").read_text())
    assert index["_class_name"] == pipeline_class
    assert {key: index[key] for key in components} == components

    pipe = diffusers.DiffusionPipeline.from_pretrained(folder)
    assert type(pipe).__name__ == pipeline_class
    pipe.set_progress_bar_config(disable=True)
    out = np.asarray(pipe(**call_kwargs(family))[0])
    assert out.shape == shape
    assert np.isfinite(out).all()


def test_tokenizers_reload(tmp_path):
    """The generated tokenizers know WORDS whole, and save and reload to the same encoding."""
    for name, tok, whole in (
        ("t5", t5_tokenizer(), lambda w: "▁" + w),
        ("clip", clip_tokenizer(), lambda w: w + "</w>"),
    ):
        tok.save_pretrained(tmp_path / name)
        again = type(tok).from_pretrained(tmp_path / name)
        text = PROMPT + " in the Rain, 3 xyzzy!"
        assert again(text).input_ids == tok(text).input_ids
        assert again.convert_ids_to_tokens(again("painting").input_ids).count(whole("painting")) == 1
        assert all(whole(w) in tok.get_vocab() for w in WORDS)
