"""Torch side of ``--quantize-attention``: diffusers' AttnProcessor2_0 with its
scaled_dot_product_attention written out in the order torch's ONNX export computes it
(q·√c and kᵀ·√c, c = 1/√d in float32; MatMul; mask Add; Softmax; MatMul with V), so that the
simulation can fake-quantize, and the replay can measure, exactly the tensors the emitted graph's
attention matmuls read. Leaves every other processor and module alone."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from diffusers.models.attention_processor import Attention, AttnProcessor2_0
from qexport.exporter.fp_export import scope_of
from qexport.passes.attention import ActQuant, AttentionPlan
from torch import nn

from qexport.errors import QexportError
from qexport.models.families import DIFFUSERS_ATTENTION, AttentionNames

Extremes = dict[str, list[float]]  # operand -> [min, max]


def fake_quant_tensor(x: torch.Tensor, q: ActQuant) -> torch.Tensor:
    """QuantizeLinear -> DequantizeLinear with a scalar scale and zero point (round half to even)."""
    scale, zero = float(q.scale), float(q.zero)
    return (torch.clamp(torch.round(x / scale) + zero, q.grid.qmin, q.grid.qmax) - zero) * scale


def attention_modules(transformer: nn.Module) -> dict[str, Attention]:
    """The diffusers Attention modules of a transformer, by module name.

    Raises:
        QexportError: one of them uses a processor other than AttnProcessor2_0 (its math is the
            one the export and the simulation are written for).
    """
    found = {name: m for name, m in transformer.named_modules() if isinstance(m, Attention)}
    for name, m in found.items():
        if type(m.processor) is not AttnProcessor2_0 and not isinstance(m.processor, ExportOrderAttention):
            raise QexportError(
                f"--quantize-attention supports diffusers' AttnProcessor2_0; attention {name!r} uses "
                f"{type(m.processor).__name__}"
            )
    return found


def attention_scopes(transformer: nn.Module) -> dict[str, str]:
    """Attention module name -> the ONNX name scope of its nodes (see fp_export.scope_of)."""
    return {name: scope_of(name) + "/" for name in attention_modules(transformer)}


def attention_ids(transformer: nn.Module) -> dict[str, str]:
    """Short ids for attention modules (A0, A1, ...): emitted tensor names ``A<i>:<operand>_q``."""
    return {name: f"A{i}" for i, name in enumerate(attention_modules(transformer))}


class ExportOrderAttention:
    """AttnProcessor2_0 with the attention core spelt out as the ONNX export does; each matmul
    operand optionally fake-quantized (``quant``) and/or its min/max recorded (``seen``)."""

    def __init__(
        self,
        quant: AttentionPlan | None = None,
        seen: Extremes | None = None,
        names: AttentionNames = DIFFUSERS_ATTENTION,
    ) -> None:
        self.quant, self.seen, self.names = quant, seen, names

    def _operand(self, name: str, x: torch.Tensor) -> torch.Tensor:
        if self.seen is not None:
            _extend(self.seen, name, x)
        return x if self.quant is None else fake_quant_tensor(x, self.quant.operand(name))

    def core(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """softmax(q·kᵀ/√d + mask)·v with the export's order of ops (symbolic_opset14's SDPA)."""
        d = torch.tensor(float(q.shape[-1]), dtype=torch.float32)
        root = torch.sqrt(torch.tensor(1.0, dtype=torch.float32) / torch.sqrt(d)).to(q.dtype)
        scores = self._operand("query", q * root) @ self._operand("key", k.transpose(-2, -1) * root)
        guard = mask is not None and mask.dtype == torch.bool
        if mask is not None:
            scores = scores + (torch.where(mask, 0.0, float("-inf")) if guard else mask)
        probs = torch.softmax(scores, dim=-1)
        if guard:
            probs = torch.where(torch.isnan(probs), 0.0, probs)
        return self._operand("probs", probs) @ self._operand("value", v)

    def __call__(
        self,
        attn: Attention,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
        *args: Any,
        **kwargs: Any,
    ) -> torch.Tensor:
        # diffusers 0.42 AttnProcessor2_0.__call__, with F.scaled_dot_product_attention -> self.core
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch_size, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch_size, channel, height * width).transpose(1, 2)
        batch_size, sequence_length, _ = (
            hidden_states.shape if encoder_hidden_states is None else encoder_hidden_states.shape
        )
        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(attention_mask, sequence_length, batch_size)
            attention_mask = attention_mask.view(batch_size, attn.heads, -1, attention_mask.shape[-1])
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        query = getattr(attn, self.names.query)(hidden_states)
        if encoder_hidden_states is None:
            encoder_hidden_states = hidden_states
        elif attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
        key = getattr(attn, self.names.key)(encoder_hidden_states)
        value = getattr(attn, self.names.value)(encoder_hidden_states)
        head_dim = key.shape[-1] // attn.heads
        query = query.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        key = key.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        value = value.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        hidden_states = self.core(query, key, value, attention_mask)
        hidden_states = hidden_states.transpose(1, 2).reshape(batch_size, -1, attn.heads * head_dim)
        hidden_states = hidden_states.to(query.dtype)
        hidden_states = attn.to_out[0](hidden_states)
        hidden_states = attn.to_out[1](hidden_states)
        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch_size, channel, height, width)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor


@contextmanager
def attention_processors(transformer: nn.Module, processors: dict[str, ExportOrderAttention]) -> Iterator[None]:
    """Within the block, the named attention modules compute with the given processors."""
    modules = attention_modules(transformer)
    saved = {name: modules[name].processor for name in processors}
    try:
        for name, p in processors.items():
            modules[name].processor = p
        yield
    finally:
        for name, old in saved.items():
            modules[name].processor = old


def _extend(seen: Extremes, key: str, x: torch.Tensor) -> None:
    lo, hi = float(x.min()), float(x.max())
    old = seen.setdefault(key, [lo, hi])
    old[0], old[1] = min(old[0], lo), max(old[1], hi)


@contextmanager
def recording(transformer: nn.Module, names: list[str]) -> Iterator[dict[str, Extremes]]:
    """Within the block, the named attentions record the min/max of their four matmul operands."""
    seen: dict[str, Extremes] = {name: {} for name in names}
    with attention_processors(transformer, {name: ExportOrderAttention(seen=seen[name]) for name in names}):
        yield seen
