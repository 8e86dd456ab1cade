"""Torch fake-quant simulation of exactly the plan a build emits: the same integer weights and
scales, the same per-tensor activation scale / zero point and round-half-to-even, the same
smoothing (divided at the linear's input where the graph folds it into the modulation or inserts
a Mul; already inside the value projection's weights where it folds there), the same channel
shift (subtracted at the input, or already in the value projection's bias), the low-rank
branch ``(x_dq · A) · B`` added to the output from the same fake-quantized input, the output
quantizer of a closed linear (its MatMul result, before the bias), the int8-rounded weights of the
float-kept layers stored weight-only (passes.weight_only), and, where planned, fake-quantized
attention matmul operands (exporter.attention)."""

from __future__ import annotations

import weakref
from collections.abc import Callable, Iterator, Mapping
from contextlib import ExitStack, contextmanager
from typing import Any

import numpy as np
import torch
from qexport.exporter.attention import ExportOrderAttention, attention_processors
from qexport.passes.plan import LayerPlan, RangePlan
from qexport.passes.quant import rows
from qexport.passes.weight_only import INT8_MAX
from torch import nn


def rounded_rows(w: torch.Tensor) -> torch.Tensor:
    """passes.weight_only.rounded(w, 0) in torch where w is: the int8 storage of each row given
    back as q · s, by the same float32 operations (bit for bit)."""
    amax = w.abs().amax(dim=1, keepdim=True)
    scale = torch.where(amax > 0, amax / INT8_MAX, torch.ones_like(amax))
    return (w / scale).round_().clamp_(-INT8_MAX, INT8_MAX).mul_(scale)


def device_weight(lp: LayerPlan, device: torch.device) -> torch.Tensor:
    """lp.weight() as the linear's [out, in] weight on `device`: the integers sent there and
    dequantized by quant.dequantize's float32 operations (bit for bit), not sent as float32."""
    if lp.coded:
        return torch.from_numpy(lp.weight().T.copy()).to(device)
    n = lp.w_q.shape[0]
    q = torch.from_numpy(lp.w_q.copy()).to(device)  # a copy: the plan's arrays are read-only
    zero = torch.from_numpy(np.array(rows(lp.w_zero, n), dtype=np.float32)).to(device)
    scale = torch.from_numpy(np.array(rows(lp.w_scale, n), dtype=np.float32)).to(device)
    return ((q.float() - zero) * scale).T.contiguous()


class Uploads:
    """The device weight of each linear of the last plan simulated, kept while the candidate plans
    of one search are scored: candidates that share a layer's weight arrays (a range search's
    ratios move only the activation quantizers) send it once. The host arrays it came from are
    only weakly referred to: a candidate plan dropped after its score is freed, not held here."""

    def __init__(self) -> None:
        self._last: dict[str, tuple[tuple[weakref.ref[np.ndarray] | None, ...], torch.Tensor]] = {}

    def weight(self, name: str, lp: LayerPlan, device: torch.device) -> torch.Tensor:
        sources = (lp.w_q, lp.w_scale, lp.w_zero, lp.codebook, lp.levels)
        last = self._last.get(name)
        if last is not None and all(
            a is b if a is None else a() is b for a, b in zip(last[0], sources, strict=True)
        ):  # fmt: skip
            return last[1]
        self._last.pop(name, None)  # the old one freed before the new one is made
        w = device_weight(lp, device)
        self._last[name] = (tuple(None if a is None else weakref.ref(a) for a in sources), w)
        return w


def dynamic_quant(x: torch.Tensor, lp: LayerPlan) -> torch.Tensor:
    """x through a run-time quantizer (passes.techniques.dynamic): DynamicQuantizeLinear's rule over
    each token's channels ("token") or the whole tensor ("tensor"), in the graph's float32 op order."""
    qmax = float(lp.a_grid.qmax)
    if lp.dynamic == "token":
        lo, hi = x.amin(dim=-1, keepdim=True).clamp(max=0.0), x.amax(dim=-1, keepdim=True).clamp(min=0.0)
    else:
        lo, hi = x.min().clamp(max=0.0), x.max().clamp(min=0.0)
    scale = ((hi - lo) / qmax).clamp(min=torch.finfo(torch.float32).tiny)
    zero = (-lo / scale).round().clamp(0.0, qmax)
    return (x / scale).round_().add_(zero).clamp_(0.0, qmax).sub_(zero).mul_(scale)


def fake_quant(x: torch.Tensor, lp: LayerPlan, output: bool = False) -> torch.Tensor:
    """x through the layer's input quantizer (output: its output quantizer, same grid)."""
    if lp.dynamic is not None and not output:
        return dynamic_quant(x, lp)
    scale_of, zero_of = (lp.o_scale, lp.o_zero) if output else (lp.a_scale, lp.a_zero)
    assert scale_of is not None and zero_of is not None
    scale, zero = float(scale_of), float(zero_of)
    # clamp(round(x/s) + z, qmin, qmax) - z is clamp(round(x/s), qmin - z, qmax - z): integers, exact in
    # float32; one new tensor, then in place
    return (x / scale).round_().clamp_(lp.a_grid.qmin - zero, lp.a_grid.qmax - zero).mul_(scale)


def transformed(
    x: torch.Tensor, divisor: torch.Tensor | None, shift: torch.Tensor | None, rotation: torch.Tensor | None
) -> torch.Tensor:
    """A linear's input as its quantizer sees it in the emitted graph: divided (explicit smoothing),
    shifted (channel shift; its bias is already b + z·W), rotated online (its weights are already Rᵀ·W)."""
    x = x if divisor is None else x * (1.0 / divisor)
    if shift is not None:  # in place where x is already a new tensor
        x = x - shift if divisor is None else x.sub_(shift)
    return x if rotation is None else x @ rotation


def requantize(module: nn.Module, args: tuple[torch.Tensor, ...], out: torch.Tensor, lp: LayerPlan) -> torch.Tensor:
    """A closed linear's output: the MatMul result (before the bias) through the output quantizer."""
    bias = getattr(module, "bias", None)
    if bias is None:
        return fake_quant(out, lp, output=True)
    return fake_quant(out - bias, lp, output=True) + bias


@contextmanager
def simulated(
    transformer: nn.Module,
    plan: RangePlan,
    uploads: Uploads | None = None,
    quantizers: Mapping[str, Callable[[torch.Tensor], torch.Tensor]] | None = None,
) -> Iterator[None]:
    """Within the block, the transformer's planned linears (and attentions) compute as the emitted
    model does. uploads: device weights kept between the candidate plans of a search; quantizers:
    input quantizers that replace the plan's for the named linears (exporter.learn trains them)."""
    modules = dict(transformer.named_modules())
    saved: list[tuple[nn.Module, torch.Tensor, torch.Tensor | None]] = []
    handles: list[Any] = []
    stack = ExitStack()
    try:
        if plan.attention:
            quantized = {name: ExportOrderAttention(quant=ap) for name, ap in plan.attention.items()}
            stack.enter_context(attention_processors(transformer, quantized))
        for name in plan.weight_only:  # nn.Linear [out, in] or nn.Embedding [rows, dim]: per row
            m = modules[name]
            saved.append((m, m.weight.data, None))
            m.weight.data = rounded_rows(m.weight.detach().float())
        for name, lp in plan.layers.items():
            m = modules[name]
            assert isinstance(m, nn.Linear)
            saved.append((m, m.weight.data, None if m.bias is None else m.bias.data))
            on = m.weight.device  # the simulation runs where the transformer is (verify --device cuda)
            m.weight.data = device_weight(lp, on) if uploads is None else uploads.weight(name, lp, on)
            if lp.bias is not None and m.bias is not None:
                m.bias.data = torch.from_numpy(lp.bias.reshape(-1).copy()).to(on)
            divisor = None if lp.divisor is None else torch.from_numpy(lp.divisor.astype("float32")).to(on)
            rot = None if lp.rotation is None else torch.from_numpy(lp.rotation.astype("float32")).to(on)
            shift = None if lp.subtract is None else torch.from_numpy(lp.subtract).to(on)
            chosen = None if quantizers is None else quantizers.get(name)

            def hook(
                module: nn.Module,
                args: tuple[torch.Tensor, ...],
                lp: LayerPlan = lp,
                d: Any = divisor,
                r: Any = rot,
                z: Any = shift,
                quant: Any = chosen,
            ) -> Any:
                x = transformed(args[0], d, z, r)
                return (fake_quant(x, lp) if quant is None else quant(x), *args[1:])

            handles.append(m.register_forward_pre_hook(hook))
            if lp.o_scale is not None:  # before the low-rank branch, which the graph adds after the bias
                handles.append(m.register_forward_hook(lambda mod, args, out, lp=lp: requantize(mod, args, out, lp)))
            if lp.lowrank_a is not None and lp.lowrank_b is not None:
                lr = (torch.from_numpy(lp.lowrank_a).to(on), torch.from_numpy(lp.lowrank_b).to(on))

                def branch(module: nn.Module, args: tuple[torch.Tensor, ...], out: torch.Tensor, lr: Any = lr) -> Any:
                    return out + (args[0] @ lr[0]) @ lr[1]  # args: the input as the pre-hook left it (x_dq)

                handles.append(m.register_forward_hook(branch))
        yield
    finally:
        stack.close()
        for h in handles:
            h.remove()
        for m, w, b in saved:
            m.weight.data = w
            if b is not None and m.bias is not None:
                m.bias.data = b
