"""A pipeline's text encoders shipped for the edge: the tokenizer.json tokenizes as the pipeline's
tokenizer does, the FP32 ONNX part computes what the torch encoder computes (every output a pipeline
reads), PixArt's own encode_prompt is reproduced, and an over-long prompt is refused."""

import numpy as np
import onnx
import pytest
import torch

pytest.importorskip("transformers", minversion="5", reason="the tiny pipelines need transformers>=5")

from pipelines import FAMILIES, TEXT_TOKENS
from qexport.exporter.text_encoders import export_text_part, text_parts

from qexport.errors import QexportError
from qexport.models.pipeline import load_pipeline
from qexport.recipe import PartPrecision
from qexport.runtime.text import TextPart

PROMPT = "a painting of a squirrel eating a burger"


def _length(part) -> int:
    return 77 if part.takes_mask is False else TEXT_TOKENS  # CLIP's fixed 77; T5 as the tiny calls use


@pytest.mark.parametrize("family", ["pixart-alpha", "sd3", "flux", "wan2.1"])
def test_text_parts_match_the_torch_encoders(tmp_path, family):
    if family == "wan2.1":
        pytest.importorskip("accelerate", reason="diffusers loads WanTransformer3DModel only with accelerate")
    pipe = load_pipeline(FAMILIES[family](tmp_path / "src"))
    out = tmp_path / "build"
    out.mkdir()
    parts = text_parts(pipe)
    assert [p.name for p in parts] == sorted(n for n in pipe.components if n.startswith("text_encoder"))
    for part in parts:
        length = _length(part)
        spec = export_text_part(part, out, length, PartPrecision.FP32)  # other precisions: test_part_precision.py
        assert spec["precision"] == "fp32"
        onnx.checker.check_model(str(out / spec["model"]))
        edge = TextPart(out, spec)
        ids, mask = edge.tokens(PROMPT)
        want = part.tokenizer(PROMPT, padding="max_length", max_length=length, truncation=True, return_tensors="np")
        assert np.array_equal(ids, want["input_ids"]) and np.array_equal(mask, want["attention_mask"])
        got = edge.encode(PROMPT)
        kwargs = {"attention_mask": torch.from_numpy(mask)} if part.takes_mask else {}
        with torch.no_grad():
            ref = part.encoder(torch.from_numpy(ids), output_hidden_states=True, **kwargs)
        pooled = getattr(ref, "text_embeds", None)
        pooled = getattr(ref, "pooler_output", None) if pooled is None else pooled
        refs = {"last_hidden_state": ref.hidden_states[-1], "penultimate_hidden_state": ref.hidden_states[-2],
                **({"pooled": pooled} if pooled is not None else {})}  # fmt: skip
        assert set(spec["outputs"]) == set(refs)
        for name, value in refs.items():
            r = value.numpy()
            assert np.linalg.norm(got[name] - r) <= 1e-5 * np.linalg.norm(r), (part.name, name)


def test_pixarts_own_prompt_encoding_is_reproduced_and_long_prompts_refused(tmp_path):
    pipe = load_pipeline(FAMILIES["pixart-alpha"](tmp_path / "src"))
    (part,) = text_parts(pipe)
    (tmp_path / "b").mkdir()
    edge = TextPart(tmp_path / "b", export_text_part(part, tmp_path / "b", TEXT_TOKENS, PartPrecision.FP32))
    with torch.no_grad():
        embeds, mask, _, _ = pipe.encode_prompt(PROMPT, do_classifier_free_guidance=False, clean_caption=False,
                                                max_sequence_length=TEXT_TOKENS)  # fmt: skip
    got = edge.encode(PROMPT)
    assert np.array_equal(got["attention_mask"], mask.numpy())
    assert np.linalg.norm(got["last_hidden_state"] - embeds.numpy()) <= 1e-5 * np.linalg.norm(embeds.numpy())
    with pytest.raises(QexportError, match=f"takes at most {TEXT_TOKENS}: shorten it"):
        edge.tokens(" ".join(["squirrel"] * (TEXT_TOKENS + 4)))
