"""A block-diagonal Hadamard applied online before the quantizer of the other linears' inputs, or
DuQuant's dual transformation (greedy block rotations around a zigzag permutation, found on the
replayed input: passes.rotate.duquant_factors) in its place.

Adaptive: rotate only where the input has outlier channels (max / median of the per-channel
magnitude >= OUTLIER_RATIO) and where rotation lowers the group's output error on the samples."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import numpy as np
import onnx_graphsurgeon as gs
from qexport.passes.graph import const, node_named
from qexport.passes.quant import Grid, dequantize, qparams, quantize, relative_error
from qexport.passes.rangeplan import GroupStep, QuantConfig
from qexport.passes.rewrite import PassConfig
from qexport.passes.rotate import compose_duquant, duquant_factors, hadamard, rotated_range
from qexport.passes.techniques.base import GraphPass, Shape, Technique
from qexport.passes.weights import weight_qparams
from qexport.targets.profile import TargetProfile

from qexport.errors import QexportError

OUTLIER_RATIO = 3.0  # adaptive online rotation: max / median of the per-channel input magnitude
ERROR_ROWS = 8192  # sample rows used to compare a group's output error with and without rotation
Factors = tuple[np.ndarray, np.ndarray, np.ndarray]  # DuQuant's R1 [B, B], channel order [C], R2 [B, B]


def _output_error(
    x: np.ndarray, lo: float, hi: float, ws: list[np.ndarray], w_grid: Grid, a_grid: Grid, config: QuantConfig,
    target: TargetProfile,
) -> float:  # fmt: skip
    """Relative squared error of the group's outputs, min-max activation and weight quantization."""
    a_scale, a_zero = qparams(np.asarray(lo), np.asarray(hi), a_grid, target.pow2_scales)
    xq = dequantize(quantize(x, a_scale, a_zero, a_grid), a_scale, a_zero)
    pairs = []
    for w in ws:
        w_scale, w_zero = weight_qparams(w, w_grid, config, target)
        pairs.append(
            (w, dequantize(quantize(w, w_scale[None, :], w_zero[None, :], w_grid), w_scale[None, :], w_zero[None, :]))
        )
    return relative_error(x, xq, pairs)


def choose_online(
    values: np.ndarray,
    magnitude: np.ndarray,
    ws: list[np.ndarray],
    bounds: tuple[float, float],
    w_grid: Grid,
    a_grid: Grid,
    config: QuantConfig,
    target: TargetProfile,
) -> tuple[np.ndarray | None, dict[str, float], Factors | None]:
    """The online rotation of one group's (smoothed) input, or None, and why (see the module doc);
    DuQuant's factors (R1, channel order, R2) of the rotation where it is DuQuant's."""
    block, channels = config.online_rotation, values.shape[1]
    ratio = float(np.max(magnitude) / max(float(np.median(magnitude)), 1e-12))
    report = {"outlier_ratio": round(ratio, 3)}
    if channels % block:
        return None, {**report, "skipped_block": float(block)}, None
    if config.rotation_choice == "adaptive" and ratio < OUTLIER_RATIO:
        return None, report, None
    x = values[:: -(-len(values) // ERROR_ROWS)]
    factors = duquant_factors(x, block) if config.rotation_transform == "duquant" else None
    rot = np.kron(np.eye(channels // block), hadamard(block)) if factors is None else compose_duquant(*factors)
    plain = _output_error(x, *bounds, ws, w_grid, a_grid, config, target)
    rlo, rhi, _, xr = rotated_range(x, rot, *bounds)
    rotated = _output_error(xr, rlo, rhi, [rot.T @ w for w in ws], w_grid, a_grid, config, target)
    report.update(error_plain=plain, error_rotated=rotated)
    if config.rotation_choice == "adaptive" and rotated >= plain:
        return None, report, None
    return rot, report, factors


def _blockwise(
    graph: gs.Graph, name: str, x: gs.Variable, r: np.ndarray, label: str, y: gs.Variable,
    shape: gs.Variable | None = None,
) -> gs.Variable:  # fmt: skip
    """y = x·diag(r, …, r) as Reshape(x, [-1, B]) · r, reshaped back by `shape` (Shape(x), made here
    when None): C·B MACs per row, not C². Returns the shape tensor."""
    rows, turned = gs.Variable(f"{name}_rows", dtype=np.float32), gs.Variable(f"{name}_out", dtype=np.float32)
    blocks = const(f"{name}_blocks", np.array([-1, len(r)], dtype=np.int64))
    graph.nodes.append(gs.Node("Reshape", f"{name}_split", inputs=[x, blocks], outputs=[rows]))
    graph.nodes.append(gs.Node("MatMul", name, inputs=[rows, const(f"{name}_{label}", r.astype(np.float32))],
                               outputs=[turned]))  # fmt: skip
    if shape is None:
        shape = gs.Variable(f"{name}_shape", dtype=np.int64)
        graph.nodes.append(gs.Node("Shape", f"{name}_of", inputs=[x], outputs=[shape]))
    graph.nodes.append(gs.Node("Reshape", f"{name}_join", inputs=[turned, shape], outputs=[y]))
    return shape


def insert_online_rotation(graph: gs.Graph, config: PassConfig, target: TargetProfile) -> gs.Graph:
    """x -> x·R before the quantizer of each group the plan rotates online (its weights come as Rᵀ·W
    from the plan). The Hadamard R = diag(H_B, …) runs blockwise; DuQuant's R = diag(R1, …)·P·diag(R2, …)
    from its factors, two blockwise MatMuls around a Gather of the channels (2·C·B MACs per row)."""
    for g in config.groups:
        rot = config.plan.online.get(g.tensor)
        if rot is None:
            continue
        x = node_named(graph, config.nodes[g.layers[0]]).inputs[0]
        y = gs.Variable(f"{g.tensor}::rotated", dtype=np.float32, shape=x.shape)
        factors = config.plan.online_factors.get(g.tensor)
        if factors is None:
            block = int(np.count_nonzero(rot[0]))
            _blockwise(graph, f"{g.tensor}::rotate", x, rot[:block, :block], "hadamard", y)
        else:
            r1, order, r2 = factors
            name = f"{g.tensor}::duquant"
            first = gs.Variable(f"{name}_first", dtype=np.float32, shape=x.shape)
            moved = gs.Variable(f"{name}_moved", dtype=np.float32, shape=x.shape)
            shape = _blockwise(graph, f"{name}_1", x, r1, "r", first)
            index = const(f"{name}_order", order.astype(np.int64))
            graph.nodes.append(gs.Node("Gather", f"{name}_permute", attrs={"axis": -1}, inputs=[first, index],
                                       outputs=[moved]))  # fmt: skip
            _blockwise(graph, f"{name}_2", moved, r2, "r", y, shape)
        for layer in g.layers:
            node_named(graph, config.nodes[layer]).inputs[0] = y
    return graph


@dataclass(frozen=True, kw_only=True)
class OnlineRotation(Technique):
    kind = "online_rotation"
    summary = "block-diagonal Hadamard (or DuQuant's rotation, permutation, rotation) before other inputs' quantizers"
    rewrites: ClassVar[Mapping[str, GraphPass]] = {"rotate": insert_online_rotation}

    block: int = 64
    choice: Literal["adaptive", "all"] = "adaptive"
    transform: Literal["hadamard", "duquant"] = "hadamard"

    def replays(self) -> bool:
        return True

    def check(self, shape: Shape) -> None:
        super().check(shape)
        if self.block < 2 or self.block & (self.block - 1):
            raise QexportError(f"recipe key 'online_rotation.block' must be a power of two >= 2, got {self.block}")

    def settings(self) -> dict[str, Any]:
        return {"online_rotation": self.block, "rotation_choice": self.choice, "rotation_transform": self.transform}

    @classmethod
    def wants_samples(cls, config: QuantConfig, fold: str) -> bool:
        return bool(config.online_rotation) and fold != "value"

    @classmethod
    def plan_group(cls, step: GroupStep) -> None:
        g, rng = step.g, step.rng
        if not rng.config.online_rotation or step.rotation is not None or g.fold == "value":
            return
        assert step.magnitude is not None
        ws = [rng.final_w[layer] for layer in g.layers]
        values = step.values
        online, rng.plan.online_report[g.tensor], factors = choose_online(
            values, step.magnitude, ws, (step.lo, step.hi), rng.w_grid, rng.a_grid, rng.config, rng.target
        )
        if online is None:
            return
        step.online = rng.plan.online[g.tensor] = online
        if factors is not None:
            rng.plan.online_factors[g.tensor] = factors
        for layer in g.layers:
            rng.final_w[layer] = online.T @ rng.final_w[layer]
        step.lo, step.hi, step.magnitude, step.values = rotated_range(values, online, step.lo, step.hi)
