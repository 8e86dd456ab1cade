"""A small caption encoder trained with tiny-latte and frozen at sampling time (the role T5
plays in OpenSora/Latte): token ids -> [B, tokens, dim] embeddings."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from qexport.errors import QexportError
from qexport.models.trust import refuse_pickled
from qexport.tokenizer import MAX_TOKENS, VOCAB

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
CLASS_NAME = "QexportCaptionEncoder"


@dataclass(frozen=True, kw_only=True)
class CaptionEncoderConfig:
    vocab_size: int = len(VOCAB)
    max_tokens: int = MAX_TOKENS
    dim: int = 64
    layers: int = 2
    heads: int = 4


class CaptionEncoder(nn.Module):
    """Token + position embedding, a pre-norm transformer encoder, a final LayerNorm."""

    def __init__(self, config: CaptionEncoderConfig) -> None:
        super().__init__()
        self.config = config
        self.token = nn.Embedding(config.vocab_size, config.dim)
        self.position = nn.Parameter(torch.zeros(1, config.max_tokens, config.dim))
        layer = nn.TransformerEncoderLayer(
            config.dim, config.heads, 2 * config.dim, dropout=0.0, batch_first=True, norm_first=True
        )
        self.encoder = nn.TransformerEncoder(layer, config.layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(config.dim)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.token(ids) + self.position[:, : ids.shape[1]]
        return self.norm(self.encoder(x))

    def save(self, folder: Path) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        (folder / CONFIG_NAME).write_text(json.dumps({"_class_name": CLASS_NAME, **asdict(self.config)}, indent=2))
        state = {k: v.detach().to(torch.float16).contiguous() for k, v in self.state_dict().items()}
        save_file(state, str(folder / WEIGHTS_NAME))

    @classmethod
    def load(cls, folder: Path) -> CaptionEncoder:
        """The encoder saved in folder (its weights from model.safetensors only).

        Raises:
            QexportError: pickled weights in its place, or no weights file.
        """
        refuse_pickled(folder)
        if not (folder / WEIGHTS_NAME).is_file():
            raise QexportError(f"{folder} has no {WEIGHTS_NAME}; save the encoder with CaptionEncoder.save")
        raw = json.loads((folder / CONFIG_NAME).read_text())
        raw.pop("_class_name", None)
        model = cls(CaptionEncoderConfig(**raw))
        state = {k: v.float() for k, v in load_file(str(folder / WEIGHTS_NAME)).items()}
        model.load_state_dict(state)
        return model.eval()


def is_caption_encoder(folder: Path) -> bool:
    """True when folder holds a caption encoder written by CaptionEncoder.save."""
    path = folder / CONFIG_NAME
    return path.is_file() and json.loads(path.read_text()).get("_class_name") == CLASS_NAME
