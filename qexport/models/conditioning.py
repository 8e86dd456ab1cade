"""Conditioners: turn prompts (captions or class labels) into the tensor the denoiser reads,
and give the null condition used for classifier-free guidance."""

from __future__ import annotations

import hashlib
from typing import Protocol

import numpy as np
import torch

from qexport.errors import QexportError
from qexport.models.text_encoder import CaptionEncoder
from qexport.tokenizer import tokenize


class Conditioner(Protocol):
    kind: str  # "caption" or "label"
    synthetic: bool

    def encode(self, prompts: list[str]) -> torch.Tensor: ...

    def null(self, n: int) -> torch.Tensor: ...


class CaptionConditioner:
    """Captions through the model's own frozen caption encoder; the null caption is ""."""

    kind = "caption"
    synthetic = False

    def __init__(self, encoder: CaptionEncoder) -> None:
        self.encoder = encoder.eval()

    @torch.no_grad()
    def encode(self, prompts: list[str]) -> torch.Tensor:
        return self.encoder(torch.from_numpy(tokenize(prompts)))

    def null(self, n: int) -> torch.Tensor:
        return self.encode([""] * n)


class LabelConditioner:
    """Class labels by name ("red circle") or index ("3"); the null class is the last index."""

    kind = "label"
    synthetic = False

    def __init__(self, names: list[str], num_classes: int) -> None:
        self.names = names
        self.num_classes = num_classes

    def index(self, label: str) -> int:
        text = label.strip().lower()
        if text.isdigit() and int(text) < self.num_classes:
            return int(text)
        if text in self.names:
            return self.names.index(text)
        shown = ", ".join(self.names) if self.names else f"0..{self.num_classes - 1}"
        raise QexportError(f"unknown class label {label!r}; valid labels: {shown}")

    def encode(self, prompts: list[str]) -> torch.Tensor:
        return torch.tensor([self.index(p) for p in prompts], dtype=torch.long)

    def null(self, n: int) -> torch.Tensor:
        return torch.full((n,), self.num_classes, dtype=torch.long)


class SyntheticCaptionConditioner:
    """Deterministic stand-in caption embeddings for random-init full-size models only.

    The weights are random, so no text encoder could give them meaning; every use of this
    conditioner is labelled synthetic in summaries.
    """

    kind = "caption"
    synthetic = True

    def __init__(self, tokens: int, dim: int) -> None:
        self.tokens, self.dim = tokens, dim

    def _one(self, prompt: str) -> np.ndarray:
        seed = int.from_bytes(hashlib.sha256(prompt.encode()).digest()[:8], "little")
        return np.random.default_rng(seed).standard_normal((self.tokens, self.dim), dtype=np.float32)

    def encode(self, prompts: list[str]) -> torch.Tensor:
        return torch.from_numpy(np.stack([self._one(p) for p in prompts]))

    def null(self, n: int) -> torch.Tensor:
        return torch.zeros(n, self.tokens, self.dim)


class MissingCaptionEncoder:
    """For a user folder with no caption encoder: fails clearly when captions are needed."""

    kind = "caption"
    synthetic = False

    def __init__(self, folder: str) -> None:
        self.folder = folder

    def encode(self, prompts: list[str]) -> torch.Tensor:
        raise QexportError(
            f"model folder {self.folder} has no caption encoder in text_encoder/; save one there "
            "with qexport.models.text_encoder.CaptionEncoder.save to condition on captions"
        )

    def null(self, n: int) -> torch.Tensor:
        return self.encode([""] * n)
