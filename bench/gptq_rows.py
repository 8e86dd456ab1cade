"""GPTQ's row loop on a GPU, eager against one CUDA graph a block, on batches of dit-xl-2's
linear shapes: wall seconds of each and whether their integers are the same (bit for bit).

    python bench/gptq_rows.py --device cuda            # on the GPU machine
    python bench/gptq_rows.py --device cuda --repeats 3 --batch 36
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import torch
from qexport.passes.gptq import _graphed_rounder, _inverse_factor, _round_block
from qexport.passes.quant import Grid

SHAPES = {"attention (1152 -> 1152)": (1152, 1152), "MLP in (1152 -> 4608)": (1152, 4608),
          "MLP out (4608 -> 1152)": (4608, 1152)}  # fmt: skip


def problem(batch: int, n: int, m: int, device: str) -> tuple[torch.Tensor, ...]:
    """W^T [batch, n, m], U [batch, n, n] of a random well-conditioned H, per-channel scales [batch, m]."""
    g = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(batch, 2 * n, n, generator=g, dtype=torch.float64, device=device)
    h = x.transpose(1, 2) @ x
    del x
    h.diagonal(dim1=-2, dim2=-1).add_(1.0)
    w = torch.randn(batch, n, m, generator=g, dtype=torch.float64, device=device) * 0.05
    scale = (w.abs().amax(dim=1) / 127).float()
    return w, _inverse_factor(h), scale, torch.zeros_like(scale)


Rounder = Callable[..., None]


def timed(
    rounder: Rounder, w: torch.Tensor, u: torch.Tensor, s: torch.Tensor, z: torch.Tensor
) -> tuple[float, torch.Tensor]:
    grid = Grid(bits=8, storage="int8", symmetric=True)
    q = torch.empty(w.shape, dtype=torch.float32, device=w.device)
    rest = w.clone()
    torch.cuda.synchronize()
    start = time.perf_counter()
    rounder(rest, u, q, s, z, False, grid)
    torch.cuda.synchronize()
    return time.perf_counter() - start, q


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--batch", type=int, default=12, help="linears of one shape solved together")
    parser.add_argument("--repeats", type=int, default=2)
    a = parser.parse_args()
    if torch.device(a.device).type != "cuda" or not torch.cuda.is_available():
        raise SystemExit(f"gptq_rows: CUDA graphs need a GPU; --device {a.device} has none (run it on the GPU machine)")
    print(f"{'shape':<26} {'batch':>5} {'eager s':>9} {'graph s':>9} {'ratio':>6}  same integers")
    for label, (n, m) in SHAPES.items():
        w, u, s, z = problem(a.batch, n, m, a.device)
        eager = [timed(_round_block, w, u, s, z) for _ in range(a.repeats)]
        graph = [timed(_graphed_rounder, w, u, s, z) for _ in range(a.repeats)]
        same = all(torch.equal(e[1], g[1]) for e, g in zip(eager, graph, strict=True))
        e, g = min(t for t, _ in eager), min(t for t, _ in graph)
        print(f"{label:<26} {a.batch:>5} {e:>9.3f} {g:>9.3f} {e / g:>6.2f}  {same}", flush=True)
        del w, u, s, z, eager, graph
        torch.cuda.empty_cache()
    print("eager: about ten kernels a row; graph: one replay a block of 128 rows (passes.gptq)")


if __name__ == "__main__":
    main()
