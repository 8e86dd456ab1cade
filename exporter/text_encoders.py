"""A pipeline's text encoders as ONNX parts for the edge: each (tokenizer, text encoder) pair of
the pipeline becomes ``<name>.onnx`` (exported once, not per step; FP32 computation, its weights
stored as the recipe's ``parts.precision`` says) and ``<name>.tokenizer.json``
(the `tokenizers` model the runtime tokenizes with). The encoder's outputs are everything the
pipelines read from it: the last hidden state, the penultimate one (SD3's CLIP), and the pooled
embedding where the class has one (CLIP's pooler output or projected text embeds)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from qexport.exporter.part_precision import export_part
from torch import nn

from qexport.errors import QexportError
from qexport.recipe import PartPrecision

TEXT_OPSET = 17


@dataclass(frozen=True, kw_only=True)
class TextPart:
    """One tokenizer + text encoder pair of a pipeline, by its component names."""

    name: str  # "text_encoder", "text_encoder_2", ...
    tokenizer: Any
    encoder: nn.Module

    @property
    def takes_mask(self) -> bool:
        """T5 / UMT5 read the attention mask; CLIP's causal text tower is called without one."""
        return "CLIP" not in type(self.encoder).__name__


def text_parts(pipe: Any) -> list[TextPart]:
    """The pipeline's (tokenizer, text encoder) pairs: text_encoder with tokenizer, text_encoder_2
    with tokenizer_2, and so on.

    Raises:
        QexportError: a text encoder without its tokenizer, or a tokenizer without a `tokenizers` model.
    """
    parts = []
    for name, encoder in sorted(pipe.components.items()):
        if not name.startswith("text_encoder") or encoder is None:
            continue
        tok_name = name.replace("text_encoder", "tokenizer")
        tokenizer = pipe.components.get(tok_name)
        if tokenizer is None or getattr(tokenizer, "backend_tokenizer", None) is None:
            raise QexportError(f"{type(pipe).__name__}'s {name} has no {tok_name} with a tokenizers model to ship")
        parts.append(TextPart(name=name, tokenizer=tokenizer, encoder=encoder.eval()))
    return parts


def encoder_outputs(encoder: nn.Module, ids: torch.Tensor, mask: torch.Tensor | None) -> dict[str, torch.Tensor]:
    """Every output a pipeline reads from a text encoder, by the names the shipped part gives them:
    the last and penultimate hidden states, and the pooled embedding where the class has one (CLIP's
    projected text embeds, else its pooler output)."""
    kwargs = {} if mask is None else {"attention_mask": mask}
    out = encoder(ids, output_hidden_states=True, **kwargs)
    values = {"last_hidden_state": out.hidden_states[-1], "penultimate_hidden_state": out.hidden_states[-2]}
    pooled = getattr(out, "text_embeds", None)
    pooled = getattr(out, "pooler_output", None) if pooled is None else pooled
    return values if pooled is None else {**values, "pooled": pooled}


class _Outputs(nn.Module):
    """(input_ids[, attention_mask]) -> encoder_outputs' values, in their order."""

    def __init__(self, encoder: nn.Module, mask: bool) -> None:
        super().__init__()
        self.encoder, self.mask = encoder, mask

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, ...]:
        return tuple(encoder_outputs(self.encoder, input_ids, attention_mask if self.mask else None).values())


@torch.no_grad()
def export_text_part(
    part: TextPart, folder: Path, max_length: int, precision: PartPrecision = PartPrecision.FP16
) -> dict[str, Any]:
    """Write the part's ONNX, its weights stored in `precision` (exporter.part_precision), and its
    tokenizer.json into folder; returns its manifest entry."""
    model = _Outputs(part.encoder, part.takes_mask).eval()
    ids = torch.ones(1, max_length, dtype=torch.long)
    inputs: tuple[torch.Tensor, ...] = (ids, torch.ones_like(ids)) if part.takes_mask else (ids,)
    names = ["input_ids", "attention_mask"][: len(inputs)]
    outputs = list(encoder_outputs(part.encoder, ids, inputs[1] if part.takes_mask else None))
    path = folder / f"{part.name}.onnx"

    def write(to: Path) -> None:
        torch.onnx.export(model, inputs, str(to), dynamo=False, opset_version=TEXT_OPSET, input_names=names,
                          output_names=outputs, do_constant_folding=True)  # fmt: skip

    stored = export_part(write, path, precision)
    tokenizer_file = f"{part.name}.tokenizer.json"
    part.tokenizer.backend_tokenizer.save(str(folder / tokenizer_file))
    pad = part.tokenizer.pad_token_id
    return {
        "name": part.name,
        "model": path.name,
        "tokenizer": tokenizer_file,
        "class": type(part.encoder).__name__,
        "max_length": max_length,
        "pad_id": int(pad) if pad is not None else 0,
        "inputs": names,
        "outputs": outputs,
        **stored,
    }
