"""The model-family registry: what qexport knows about each diffusers transformer class, as data.
How the denoiser is called, what conditions it, whether its latents have frames, and how its
attention layers are named. Nothing else in qexport branches on a class name or a module suffix.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass, field
from typing import Any, Literal

from qexport.errors import QexportError


@dataclass(frozen=True, kw_only=True)
class AttentionNames:
    """The child modules of one attention block (diffusers' ``Attention``)."""

    query: str = "to_q"
    key: str = "to_k"
    value: str = "to_v"
    output: str = "to_out.0"  # the output linear (to_out.1 is its dropout)

    def block_of(self, output_layer: str) -> str | None:
        """The attention block of an output linear's name, or None if the name is not one."""
        suffix = "." + self.output
        return output_layer.removesuffix(suffix) if output_layer.endswith(suffix) else None

    def value_of(self, output_layer: str) -> str | None:
        """The value projection that feeds an output linear (through softmax(QK^T)·V)."""
        block = self.block_of(output_layer)
        return None if block is None else f"{block}.{self.value}"


DIFFUSERS_ATTENTION = AttentionNames()


@dataclass(frozen=True, kw_only=True)
class Family:
    """One diffusers transformer class."""

    class_name: str
    conditioning: Literal["caption", "label"]  # caption embeddings [B, tokens, dim], or class ids [B]
    # the keyword its condition goes in when qexport calls the transformer itself (a bare transformer
    # folder or a built-in); None: only through its pipeline's own __call__ (models.pipeline)
    call: Literal["class_labels", "encoder_hidden_states", "pixart"] | None
    frames_key: str | None = None  # config key of the frame count when latents are [C, F, H, W]
    attention: AttentionNames = field(default_factory=AttentionNames)
    blocks: str = "*transformer_blocks.*"  # the linears quantized by default (fnmatch; minus calib's FP list)


FAMILIES: dict[str, Family] = {
    f.class_name: f
    for f in (
        Family(class_name="DiTTransformer2DModel", conditioning="label", call="class_labels"),
        Family(class_name="PixArtTransformer2DModel", conditioning="caption", call="pixart"),
        Family(
            class_name="LatteTransformer3DModel",
            conditioning="caption",
            call="encoder_hidden_states",
            frames_key="video_length",
        ),
        Family(class_name="SD3Transformer2DModel", conditioning="caption", call=None),
        Family(class_name="FluxTransformer2DModel", conditioning="caption", call=None),
        Family(class_name="WanTransformer3DModel", conditioning="caption", call=None, blocks="blocks.*"),
        Family(class_name="CogVideoXTransformer3DModel", conditioning="caption", call=None),
        Family(class_name="LTXVideoTransformer3DModel", conditioning="caption", call=None),
    )
}


def family_of(class_name: str) -> Family:
    """The registry entry of a transformer class.

    Raises:
        QexportError: a class qexport has no entry for (names the supported ones).
    """
    family = FAMILIES.get(class_name)
    if family is None:
        raise QexportError(f"transformer class {class_name!r} is not supported; supported: {', '.join(FAMILIES)}")
    return family


GENERIC_BLOCKS = ("*transformer_blocks.*", "*blocks.*")  # tried in order by the generic entry


def family_for(transformer: Any) -> Family:
    """The registry entry of a pipeline's transformer, or, for a class without one, the generic
    entry of a standard diffusers DiT: its attention in diffusers' ``Attention`` modules with
    to_q / to_k / to_v / to_out.0 linears, and its linears under ``*transformer_blocks.*`` (else
    ``*blocks.*``); it runs through its pipeline's own __call__ only.

    Raises:
        QexportError: a class without an entry that is not such a DiT, naming what is missing.
    """
    name = type(transformer).__name__
    if name in FAMILIES:
        return FAMILIES[name]
    import torch

    names = DIFFUSERS_ATTENTION
    modules = dict(transformer.named_modules())
    attentions = [n for n, m in modules.items() if type(m).__name__ == "Attention"]
    linear = torch.nn.Linear
    standard = [n for n in attentions
                if all(isinstance(modules.get(f"{n}.{c}"), linear) for c in (names.query, names.key, names.value))
                and isinstance(modules.get(f"{n}.{names.output}"), linear)]  # fmt: skip
    linears = [n for n, m in modules.items() if isinstance(m, linear)]
    blocks = next((b for b in GENERIC_BLOCKS if any(fnmatch.fnmatchcase(n, b) for n in linears)), None)
    missing = []
    if not standard:
        missing.append("no diffusers Attention module with to_q / to_k / to_v / to_out.0 linears")
    if blocks is None:
        missing.append(f"no linear under {' or '.join(GENERIC_BLOCKS)}")
    if missing or blocks is None:
        raise QexportError(
            f"transformer class {name!r} has no family entry and is not a standard diffusers DiT "
            f"({'; '.join(missing)}); add a Family to qexport/models/families.py"
        )
    return Family(class_name=name, conditioning="caption", call=None, blocks=blocks)
