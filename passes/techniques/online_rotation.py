"""A block-diagonal Hadamard applied online before the quantizer of the other linears' inputs, or
DuQuant's dual transformation (greedy block rotations around a zigzag permutation, found on the
replayed input: passes.rotate.duquant_rotation) in its place.

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
from qexport.passes.rotate import duquant_rotation, hadamard, rotated_range
from qexport.passes.techniques.base import GraphPass, Shape, Technique
from qexport.passes.weights import weight_qparams
from qexport.targets.profile import TargetProfile

from qexport.errors import QexportError

OUTLIER_RATIO = 3.0  # adaptive online rotation: max / median of the per-channel input magnitude
ERROR_ROWS = 8192  # sample rows used to compare a group's output error with and without rotation


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
) -> tuple[np.ndarray | None, dict[str, float]]:
    """The online rotation of one group's (smoothed) input, or None, and why (see the module doc)."""
    block, channels = config.online_rotation, values.shape[1]
    ratio = float(np.max(magnitude) / max(float(np.median(magnitude)), 1e-12))
    report = {"outlier_ratio": round(ratio, 3)}
    if channels % block:
        return None, {**report, "skipped_block": float(block)}
    if config.rotation_choice == "adaptive" and ratio < OUTLIER_RATIO:
        return None, report
    x = values[:: -(-len(values) // ERROR_ROWS)]
    if config.rotation_transform == "duquant":
        rot = duquant_rotation(x, block)
    else:
        rot = np.kron(np.eye(channels // block), hadamard(block))
    plain = _output_error(x, *bounds, ws, w_grid, a_grid, config, target)
    rlo, rhi, _, xr = rotated_range(x, rot, *bounds)
    rotated = _output_error(xr, rlo, rhi, [rot.T @ w for w in ws], w_grid, a_grid, config, target)
    report.update(error_plain=plain, error_rotated=rotated)
    if config.rotation_choice == "adaptive" and rotated >= plain:
        return None, report
    return rot, report


def equal_blocks(rot: np.ndarray) -> int:
    """B where rot is diag(R_B, …, R_B), else rot's whole width."""
    block = int(np.count_nonzero(rot[0]))
    if len(rot) % block == 0 and np.array_equal(rot, np.kron(np.eye(len(rot) // block), rot[:block, :block])):
        return block
    return len(rot)


def insert_online_rotation(graph: gs.Graph, config: PassConfig, target: TargetProfile) -> gs.Graph:
    """x -> x·R before the quantizer of each group the plan rotates online (its weights come as Rᵀ·W
    from the plan). A block-diagonal R of equal blocks runs as Reshape(x, [-1, B]) · H_B, reshaped
    back to x's shape: C·B MACs per row, not C²; any other (DuQuant's) as one C×C MatMul."""
    for g in config.groups:
        rot = config.plan.online.get(g.tensor)
        if rot is None:
            continue
        x = node_named(graph, config.nodes[g.layers[0]]).inputs[0]
        block = equal_blocks(rot)
        name = f"{g.tensor}::rotate"
        rows, turned = gs.Variable(f"{name}_rows", dtype=np.float32), gs.Variable(f"{name}_out", dtype=np.float32)
        shape = gs.Variable(f"{name}_shape", dtype=np.int64)
        y = gs.Variable(f"{g.tensor}::rotated", dtype=np.float32, shape=x.shape)
        blocks = const(f"{name}_blocks", np.array([-1, block], dtype=np.int64))
        h = const(f"{name}_hadamard", rot[:block, :block].astype(np.float32))
        graph.nodes.append(gs.Node("Reshape", f"{name}_split", inputs=[x, blocks], outputs=[rows]))
        graph.nodes.append(gs.Node("MatMul", name, inputs=[rows, h], outputs=[turned]))
        graph.nodes.append(gs.Node("Shape", f"{name}_of", inputs=[x], outputs=[shape]))
        graph.nodes.append(gs.Node("Reshape", f"{name}_join", inputs=[turned, shape], outputs=[y]))
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
        online, rng.plan.online_report[g.tensor] = choose_online(
            values, step.magnitude, ws, (step.lo, step.hi), rng.w_grid, rng.a_grid, rng.config, rng.target
        )
        if online is None:
            return
        step.online = rng.plan.online[g.tensor] = online
        for layer in g.layers:
            rng.final_w[layer] = online.T @ rng.final_w[layer]
        step.lo, step.hi, step.magnitude, step.values = rotated_range(values, online, step.lo, step.hi)
