"""Configs of the diffusers transformer classes qexport knows: the built-in tiny models and
the named full-size architectures (random-init, for speed/memory/export work at real scale)."""

from __future__ import annotations

from typing import Any

import diffusers
from torch import nn

from qexport.models.families import family_of


def model_class(class_name: str) -> Any:
    """The diffusers class of a registered family (qexport.models.families).

    Raises:
        QexportError: a class the registry has no entry for.
    """
    return getattr(diffusers, family_of(class_name).class_name)


TINY_LATTE: dict[str, Any] = {
    "num_attention_heads": 4,
    "attention_head_dim": 48,
    "in_channels": 3,
    "out_channels": 3,
    "num_layers": 4,
    "cross_attention_dim": 192,
    "attention_bias": True,
    "sample_size": 32,
    "patch_size": 4,
    "activation_fn": "gelu-approximate",
    "num_embeds_ada_norm": 1000,
    "norm_type": "ada_norm_single",
    "norm_elementwise_affine": False,
    "norm_eps": 1e-6,
    "caption_channels": 64,
    "video_length": 16,
}

TINY_DIT: dict[str, Any] = {
    "num_attention_heads": 4,
    "attention_head_dim": 32,
    "in_channels": 3,
    "out_channels": 3,
    "num_layers": 6,
    "sample_size": 32,
    "patch_size": 4,
    "num_embeds_ada_norm": 18,
}

# Full-size configs of the published models (random weights: no checkpoint can be downloaded here).
FULL_SIZE: dict[str, tuple[str, dict[str, Any], str]] = {
    "dit-xl-2": (
        "DiTTransformer2DModel",
        {
            "num_attention_heads": 16,
            "attention_head_dim": 72,
            "in_channels": 4,
            "out_channels": 8,
            "num_layers": 28,
            "sample_size": 32,
            "patch_size": 2,
            "num_embeds_ada_norm": 1000,
        },
        "DiT-XL/2, 256 px (4x32x32 latent), class-conditional, adaLN-Zero",
    ),
    "dit-b-2": (
        "DiTTransformer2DModel",
        {
            "num_attention_heads": 12,
            "attention_head_dim": 64,
            "in_channels": 4,
            "out_channels": 8,
            "num_layers": 12,
            "sample_size": 32,
            "patch_size": 2,
            "num_embeds_ada_norm": 1000,
        },
        "DiT-B/2, 256 px (4x32x32 latent), class-conditional, adaLN-Zero",
    ),
    "pixart-alpha-512": (
        "PixArtTransformer2DModel",
        {
            "num_attention_heads": 16,
            "attention_head_dim": 72,
            "in_channels": 4,
            "out_channels": 8,
            "num_layers": 28,
            "cross_attention_dim": 1152,
            "attention_bias": True,
            "sample_size": 64,
            "patch_size": 2,
            "activation_fn": "gelu-approximate",
            "num_embeds_ada_norm": 1000,
            "norm_type": "ada_norm_single",
            "norm_elementwise_affine": False,
            "norm_eps": 1e-6,
            "caption_channels": 4096,
            "use_additional_conditions": False,
        },
        "PixArt-alpha 512 px (4x64x64 latent), T5 captions 120x4096, adaLN-single",
    ),
    "latte-1": (
        "LatteTransformer3DModel",
        {
            "num_attention_heads": 16,
            "attention_head_dim": 72,
            "in_channels": 4,
            "out_channels": 8,
            "num_layers": 28,
            "cross_attention_dim": 1152,
            "attention_bias": True,
            "sample_size": 32,
            "patch_size": 2,
            "activation_fn": "gelu-approximate",
            "num_embeds_ada_norm": 1000,
            "norm_type": "ada_norm_single",
            "norm_elementwise_affine": False,
            "norm_eps": 1e-6,
            "caption_channels": 4096,
            "video_length": 16,
        },
        "Latte-1, 16 frames, 256 px (4x16x32x32 latent), T5 captions 120x4096, adaLN-single",
    ),
}

CAPTION_TOKENS_FULL_SIZE = 120


def build(class_name: str, config: dict[str, Any]) -> nn.Module:
    """Instantiate a diffusers transformer class from its config."""
    return model_class(class_name)(**config)
