"""Learned static activation quantizers (exporter.learn): each transformer block's input step sizes
and zero points trained against the FP model's block outputs on the replayed calibration prompts,
block by block, per range. Folded into the plan's own scales and zero points: plain QDQ."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from qexport.passes.rangeplan import QuantConfig, RangePlan
from qexport.passes.techniques.base import Shape, Technique

from qexport.errors import QexportError


@dataclass(frozen=True, kw_only=True)
class LearnedQuantizers(Technique):
    kind = "learned"
    summary = "train each block's input step sizes and zero points (LSQ+) against FP block outputs, block by block"
    excludes = ("dynamic_activations", "precompute_kv")

    iterations: int = 100  # Adam steps per block and range
    # for each range after the first: Adam steps per block, started from the range before (each linear's
    # learned step size and zero point as ratio and offset to that range's planned ones, carried over);
    # None: every range trains `iterations` from its own plan
    warm_iterations: int | None = None
    lr: float = 0.01  # on the log step sizes and the zero points
    rows: int = 16  # replayed denoiser rows per range (steps x prompts x CFG twins), evenly chosen
    seed: int = 0  # the minibatches' order

    def replays(self) -> bool:
        return True

    def check(self, shape: Shape) -> None:
        super().check(shape)
        if self.iterations < 1 or self.rows < 1 or not self.lr > 0:
            raise QexportError(f"learned needs iterations >= 1, rows >= 1 and lr > 0; got iterations "
                               f"{self.iterations}, rows {self.rows}, lr {self.lr}")  # fmt: skip
        if self.warm_iterations is not None and self.warm_iterations < 0:
            raise QexportError(f"learned.warm_iterations must be >= 0 (or null); got {self.warm_iterations}")

    @classmethod
    def record(cls, config: QuantConfig, plans: list[RangePlan]) -> dict[str, Any]:
        chosen = config.techniques.get(cls.kind)
        if not isinstance(chosen, LearnedQuantizers):
            return {}
        counts = [len(p.parts.get(cls.kind, {})) for p in plans]
        # per range, the blocks' output MSE summed, before and after training (a re-plan has none)
        mse = [[sum(v[i] for v in p.parts["learned_mse"].values()) for i in (0, 1)]
               for p in plans if "learned_mse" in p.parts]  # fmt: skip
        return {cls.kind: {"iterations": chosen.iterations, "warm_iterations": chosen.warm_iterations,
                           "lr": chosen.lr, "rows": chosen.rows, "seed": chosen.seed,
                           "linears": max(counts, default=0), "block_mse": mse}}  # fmt: skip

    @classmethod
    def describe(cls, quantization: Mapping[str, Any]) -> list[str]:
        lq = quantization.get(cls.kind)
        if not lq:
            return []
        warm = lq.get("warm_iterations")
        steps = f"{lq['iterations']} Adam steps"
        steps += "" if warm is None else f", later ranges {warm} from the range before"
        lines = [f"  learned    input step sizes and zero points of {lq['linears']} linears per range, trained block "
                 f"by block ({steps}, lr {lq['lr']:g}, {lq['rows']} replayed rows)"]  # fmt: skip
        mse = lq.get("block_mse") or []
        if mse:
            change = sum(after / before - 1 for before, after in mse if before > 0) / len(mse)
            lines.append(f"             blocks' output MSE against FP {100 * change:+.0f}% (mean of {len(mse)} ranges)")
        return lines
