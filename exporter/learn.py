"""Learned static activation quantizers: per range, each transformer block's input quantizers
(step size and zero point, LSQ+) trained against the FP model's block outputs, block by block.

The replayed calibration rows of the range's steps (``rows`` of them, evenly chosen) go through the
FP transformer once, which records every block's output. They then go through the transformer as
the plan quantizes it; when a block is reached, its input — the output of the blocks already
trained, quantized — is held and the block's quantizers are trained on it for ``iterations``
Adam steps against the recorded FP output (mean squared error; minibatches of the block's leading
rows, seeded), after which the block runs with them and the pass goes on. Rounding passes its
gradient straight through (LSQ, Esser et al. 2020; LSQ+, Bhalgat et al. 2020: a learned zero
point); step sizes are trained as logarithms.

What is learned folds into the plan's own fields — each linear's per-tensor scale and zero point —
so the emitted model is the plain QDQ graph it was, and a re-plan reads the values from the
manifest instead of training again. Weights, the attention operands' quantizers and the linears
outside the blocks keep what planning chose.
"""

from __future__ import annotations

import math
from dataclasses import replace
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from qexport.exporter.replay import CalibrationReplay, exact_fp32
from qexport.exporter.simulate import simulated
from qexport.passes.quant import STORAGE
from qexport.passes.rangeplan import LayerPlan, RangePlan
from qexport.targets.profile import TargetProfile
from torch import nn

from qexport.errors import QexportError

TOKENS = 2048  # tokens of a block's input per training minibatch (whole leading rows)

Learned = dict[str, tuple[float, float]]  # linear -> (input scale, input zero point)


def _round(x: torch.Tensor) -> torch.Tensor:
    """Round to nearest, the gradient passed straight through."""
    return x + (x.round() - x).detach()


class _Quantizer(nn.Module):
    """A linear's input quantizer with a trainable step size (as its log) and zero point."""

    def __init__(self, lp: LayerPlan, start: tuple[float, float] = (0.0, 0.0)) -> None:
        """start: added to the planned log step size and zero point (a warm start)."""
        super().__init__()
        self.log_scale = nn.Parameter(torch.tensor(math.log(float(lp.a_scale)) + start[0], dtype=torch.float64))
        self.zero = nn.Parameter(torch.tensor(float(lp.a_zero) + start[1], dtype=torch.float64))
        self.zero.requires_grad_(not lp.a_grid.symmetric)  # a symmetric grid keeps its zero point
        self.qmin, self.qmax = float(lp.a_grid.qmin), float(lp.a_grid.qmax)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale = self.log_scale.exp().float()
        zero = _round(self.zero.clamp(self.qmin, self.qmax)).float()
        q = (_round(x / scale) + zero).clamp(self.qmin, self.qmax)
        return (q - zero) * scale

    def value(self) -> tuple[float, float]:
        return math.exp(float(self.log_scale.detach())), float(
            round(float(self.zero.detach().clamp(self.qmin, self.qmax)))
        )


def blocks(transformer: nn.Module, plan: RangePlan) -> dict[str, nn.Module]:
    """The transformer's blocks that hold planned linears: the items of its top-level ModuleLists."""
    found: dict[str, nn.Module] = {}
    for name, child in transformer.named_children():
        if isinstance(child, nn.ModuleList):
            for i, block in enumerate(child):
                prefix = f"{name}.{i}."
                if any(layer.startswith(prefix) for layer in plan.layers):
                    found[f"{name}.{i}"] = block
    return found


def _rows(replay: CalibrationReplay, steps: list[int], count: int) -> tuple[torch.Tensor, ...]:
    """The denoiser inputs (latents, timesteps, conditioning) of `count` replayed rows of the
    range's steps, evenly chosen over steps, prompts and the unconditional twins."""
    per = len(replay.cond)
    xs = torch.cat([replay.inputs[k] for k in steps])
    ts = torch.cat([torch.full((per,), replay.timesteps[k], dtype=torch.long) for k in steps])
    cond = replay.cond.repeat(len(steps), *([1] * (replay.cond.dim() - 1)))
    pick = torch.from_numpy(np.unique(np.linspace(0, len(xs) - 1, min(count, len(xs))).round().astype(np.int64)))
    return xs[pick.to(xs.device)], ts[pick].to(replay.device), cond[pick.to(cond.device)]


def _first(out: Any) -> torch.Tensor:
    return out if isinstance(out, torch.Tensor) else out[0]


def _take(value: Any, index: torch.Tensor, rows: int) -> Any:
    """A block argument's minibatch: tensors whose leading axis is the block's rows are indexed."""
    if isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape[0] == rows:
        return value[index]
    return value


def learn(
    replay: CalibrationReplay,
    plan: RangePlan,
    rows: int,
    iterations: int,
    lr: float,
    seed: int,
    start: dict[str, tuple[float, float]] | None = None,
) -> tuple[Learned, dict[str, tuple[float, float]]]:
    """The trained input quantizers of the planned linears inside the transformer's blocks, and
    each block's output MSE before and after training (on its training input). The transformer
    runs as `simulated` has the plan, these quantizers in place of the plan's input quantizers
    (before a target's output quantizers exist: those are planned on the result). `start`: per
    linear, what to add to its planned log step size and zero point before training (warm_start)."""
    transformer = replay.adapter.transformer
    found = blocks(transformer, plan)
    if not found:
        raise QexportError("technique 'learned' trains the quantizers of a transformer's blocks, and this "
                           "model's planned linears are in none (no top-level ModuleList holds them); "
                           "drop 'learned'")  # fmt: skip
    x, t, cond = _rows(replay, plan.steps, rows)
    targets: dict[str, torch.Tensor] = {}
    record = [b.register_forward_hook(lambda m, a, out, n=n: targets.__setitem__(n, _first(out).detach().clone()))
              for n, b in found.items()]  # fmt: skip
    try:
        with torch.no_grad(), exact_fp32():
            replay.denoiser(x, t, cond)
    finally:
        for h in record:
            h.remove()
    quantizers = {layer: _Quantizer(plan.layers[layer], (start or {}).get(layer, (0.0, 0.0))).to(replay.device)
                  for layer in plan.layers if any(layer.startswith(f"{b}.") for b in found)}  # fmt: skip
    errors: dict[str, tuple[float, float]] = {}
    generator = torch.Generator().manual_seed(seed)

    busy: list[str] = []  # the block being trained (its own calls skip this hook)

    def train(name: str, block: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        if busy or name in errors:
            return
        busy.append(name)
        try:
            _train(name, block, args, kwargs)
        finally:
            busy.pop()

    def _train(name: str, block: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        mine = [q for layer, q in quantizers.items() if layer.startswith(f"{name}.")]
        params = [p for q in mine for p in q.parameters() if p.requires_grad]
        target = targets[name]
        lead = target.shape[0]
        batch = max(1, min(lead, TOKENS // max(1, int(np.prod(target.shape[1:-1])))))
        optimizer = torch.optim.Adam(params, lr=lr)

        def loss_on(index: torch.Tensor) -> torch.Tensor:
            a = tuple(_take(v, index, lead) for v in args)
            k = {key: _take(v, index, lead) for key, v in kwargs.items()}
            return F.mse_loss(_first(block(*a, **k)), target[index])

        whole = torch.arange(lead, device=target.device)
        with torch.enable_grad():
            with torch.no_grad():
                before = float(loss_on(whole))
            for _ in range(iterations):
                index = torch.randperm(lead, generator=generator)[:batch].to(target.device)
                optimizer.zero_grad()
                loss_on(index).backward()
                optimizer.step()
            with torch.no_grad():
                errors[name] = (before, float(loss_on(whole)))

    hooks = [b.register_forward_pre_hook(lambda m, a, k, n=n: train(n, m, a, k), with_kwargs=True)
             for n, b in found.items()]  # fmt: skip
    frozen = [p for p in transformer.parameters() if p.requires_grad]
    for p in frozen:
        p.requires_grad_(False)
    try:
        with torch.no_grad(), exact_fp32(), simulated(transformer, plan, quantizers=quantizers):
            replay.denoiser(x, t, cond)
    finally:
        for h in hooks:
            h.remove()
        for p in frozen:
            p.requires_grad_(True)
    return {layer: q.value() for layer, q in quantizers.items()}, errors


def warm_start(previous: RangePlan) -> dict[str, tuple[float, float]]:
    """Per linear, how far the range before moved its planned input quantizer by learning: the log
    of the learned over the planned step size, and the learned less the planned zero point."""
    planned = previous.parts.get("learned_from", {})
    return {layer: (math.log(scale / planned[layer][0]), zero - planned[layer][1])
            for layer, (scale, zero) in previous.parts.get("learned", {}).items() if layer in planned}  # fmt: skip


def with_learned(plan: RangePlan, learned: Learned, target: TargetProfile) -> RangePlan:
    """The plan with the learned input quantizers (pow2 targets: each scale rounded up to a power of
    two); what planning had chosen stays in parts["learned_from"] (the next range's warm start)."""
    planned = {layer: (float(plan.layers[layer].a_scale), float(plan.layers[layer].a_zero)) for layer in learned}
    layers = dict(plan.layers)
    for layer, (scale, zero) in learned.items():
        lp = layers[layer]
        if target.pow2_scales:
            scale = 2.0 ** math.ceil(math.log2(scale))
        dtype = STORAGE[lp.a_grid.storage][0]
        layers[layer] = replace(lp, a_scale=np.asarray(scale, dtype=np.float32), a_zero=np.asarray(zero, dtype=dtype))
    return replace(plan, layers=layers, parts={**plan.parts, "learned": dict(learned), "learned_from": planned})
