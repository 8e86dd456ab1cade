"""Per-step specialisation: with the timestep a constant, fold every t-only path to constants,
then shrink constants that constant folding materialised with repeated rows (the modulation
vector repeated per frame or per patch) back to broadcast size, so per-step models differ by a
few small vectors only."""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs
from qexport.passes.graph import consumers

ELEMENTWISE = ("Add", "Mul", "Sub", "Div")


def fold_constants(graph: gs.Graph) -> gs.Graph:
    return graph.fold_constants().cleanup().toposort()


def _aligned(shape: tuple[int, ...], rank: int) -> tuple[int, ...]:
    return (1,) * (rank - len(shape)) + tuple(shape)


def compact_constants(graph: gs.Graph) -> gs.Graph:
    """Collapse axes along which a constant repeats, where broadcasting gives the same result."""
    cons = consumers(graph)
    for tensor in list(graph.tensors().values()):
        if not isinstance(tensor, gs.Constant):
            continue
        values = np.asarray(tensor.values)
        users = cons.get(tensor.name, [])
        if values.ndim == 0 or values.size < 2 or not users or any(n.op not in ELEMENTWISE for n in users):
            continue
        shapes = []
        for node in users:
            other = next((t for t in node.inputs if t is not tensor), None)
            if other is None or other.shape is None or any(not isinstance(d, int) for d in other.shape):
                break
            shapes.append(tuple(other.shape))
        else:
            rank = max(values.ndim, *(len(s) for s in shapes))
            full = _aligned(values.shape, rank)
            others = [_aligned(s, rank) for s in shapes]
            compact = values.reshape(full)
            for axis in range(rank):
                size = compact.shape[axis]
                if size > 1 and all(o[axis] == full[axis] for o in others):
                    first = np.take(compact, [0], axis=axis)
                    if np.array_equal(compact, np.broadcast_to(first, compact.shape)):
                        compact = first
            if compact.size < values.size:
                tensor.values = np.ascontiguousarray(compact)
    return graph
