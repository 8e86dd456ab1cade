"""``sweep``: build and evaluate a grid of methods x bit widths x time ranges from one .qstats,
all from the same noise, and lay the measurements out as the seed paper's tables."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qexport.errors import QexportError
from qexport.exporter.build import BuildConfig, build
from qexport.models.registry import ModelRequest
from qexport.passes.plan import Smooth
from qexport.progress import Progress, report
from qexport.recipe import Recipe, with_settings
from qexport.verification.evaluate import EvalResult, evaluate

# method -> (smoothing, timestep-wise, other recipe settings); "ranges" replaces timestep-wise when given.
# "Dynamic" is the seed paper's baseline row (ViDiT-Q): per-channel weights, activations quantized per
# token at run time, one model for every step; not NPU-static. "PTQ4DiT": its salience balancing (SmoothQuant
# at --alpha, PTQ4DiT's 0.5, from the Spearman-weighted salience over the steps), one model. "DuQuant":
# SmoothQuant at --alpha, then DuQuant's rotation, permutation and rotation online before every
# quantized input that has no offline rotation, one model. "ASQ": SmoothQuant at --alpha, one model.
# The weight formats, each on CW+TW (no smoothing, one model): "Q-DiT" group-wise weights (groups of 64
# input channels), "VQ4DiT" codebook weights (vectors of 2), "TwinLog" LRQ-DiT's twin-log weights
METHODS: dict[str, tuple[Smooth, bool, tuple[str, ...]]] = {
    "Dynamic": (Smooth.NONE, False, ("dynamic_activations=on",)),
    "PTQ4DiT": (Smooth.ASQ, False, ("smoothquant.statistic=spearman",)),
    "DuQuant": (
        Smooth.ASQ,
        False,
        ("online_rotation=on", "online_rotation.transform=duquant", "online_rotation.choice=all"),
    ),
    "ASQ": (Smooth.ASQ, False, ()),
    "Q-DiT": (Smooth.NONE, False, ("group_weights=on",)),
    "VQ4DiT": (Smooth.NONE, False, ("codebook_weights=on",)),
    "TwinLog": (Smooth.NONE, False, ("twin_log_weights=on",)),
    "CW+TW": (Smooth.NONE, False, ()),
    "+TSW": (Smooth.NONE, True, ()),
    "+ASQ": (Smooth.ASQ, True, ()),
    "+TSQ+TSW": (Smooth.TSQ, True, ()),
}
BITS = ("W8A8", "W6A8", "W4A8", "W8A16", "W6A6", "W4A6", "W4A4")


@dataclass(frozen=True, kw_only=True)
class Cell:
    method: str
    bits: str
    ranges: int | None  # None: one per step (or one range for CW+TW)

    @property
    def name(self) -> str:
        r = "" if self.ranges is None else f" {self.ranges}R"
        return f"{self.bits} {self.method}{r}"


def parse_bits(text: str) -> tuple[int, int]:
    m = re.fullmatch(r"W(\d+)A(\d+)", text.strip().upper())
    if not m:
        raise QexportError(f"bit widths look like W8A8, got {text!r}; e.g. {', '.join(BITS)}")
    return int(m.group(1)), int(m.group(2))


def grid(methods: list[str], bits: list[str], ranges: list[int] | None) -> list[Cell]:
    """Every requested cell; unknown methods / bits and cells no recipe can express are refused
    before any work."""
    for m in methods:
        if m not in METHODS:
            raise QexportError(f"unknown method {m!r}; choose from {', '.join(METHODS)}")
    for b in bits:
        parse_bits(b)
    if not ranges:
        cells = [Cell(method=m, bits=b, ranges=None) for m in methods for b in bits]
    else:
        cells = [Cell(method=m, bits=b, ranges=r) for m in methods for b in bits for r in ranges]
    for cell in cells:
        try:
            cell_recipe(cell, 0.5)
        except QexportError as exc:
            raise QexportError(f"sweep cell {cell.name}: {exc}") from None
    return cells


def cell_recipe(cell: Cell, alpha: float) -> Recipe:
    """The recipe one cell builds."""
    w, a = parse_bits(cell.bits)
    smooth, tsw, extra = METHODS[cell.method]
    ranges = cell.ranges if cell.ranges is not None else (None if tsw else 1)
    smoothing = [] if smooth == Smooth.NONE else [f"smoothquant.mode={smooth.value}", f"smoothquant.alpha={alpha}"]
    return with_settings(Recipe(), [f"bits.weights={w}", f"bits.activations={a}",
                                    f"granularity.time_ranges={'null' if ranges is None else ranges}",
                                    *smoothing, *extra])  # fmt: skip


def sweep(
    stats_path: Path,
    cells: list[Cell],
    work: Path,
    prompts: list[str],
    seeds: list[int],
    alpha: float = 0.5,
    progress: Progress | None = None,
    model: ModelRequest | None = None,
) -> tuple[EvalResult, dict[str, Cell]]:
    """Build every cell into work/ and evaluate them together.

    Args:
        model: the consent to load a model folder the statistics name, and the prompts to check first.
    """
    folders: dict[str, Cell] = {}
    for n, cell in enumerate(cells):
        report(progress, "sweep builds", n, len(cells), f"building {cell.name}")
        out = work / re.sub(r"[^A-Za-z0-9]+", "_", cell.name).strip("_")
        build(stats_path, out, BuildConfig(recipe=cell_recipe(cell, alpha), force=True), model=model)
        folders[str(out)] = cell
        report(progress, "sweep builds", n + 1, len(cells), f"built {cell.name}")
    return evaluate([Path(f) for f in folders], prompts, seeds, progress=progress, model=model), folders


def paper_tables(result: dict[str, Any], cells: dict[str, Cell]) -> list[str]:
    """Markdown tables: methods x bits (Tables I/IV) and, when ranges vary, ranges x bits (III)."""
    fp = result["fp"]
    lines = []
    by = {(c.method, c.bits, c.ranges): result["builds"][f] for f, c in cells.items()}
    methods = list(dict.fromkeys(c.method for c in cells.values()))
    bits = list(dict.fromkeys(c.bits for c in cells.values()))
    ranges = list(dict.fromkeys(c.ranges for c in cells.values()))
    for r in ranges:
        title = "one model per step (TSW) / one range (CW+TW)" if r is None else f"{r} time ranges"
        lines += [f"**{title}** — final PSNR vs FP (dB) / judge adherence (FP {fp['adherence']:.3f})", ""]
        lines.append("| method | " + " | ".join(bits) + " |")
        lines.append("|---|" + "---|" * len(bits))
        for m in methods:
            row = []
            for b in bits:
                s = by.get((m, b, r))
                row.append("–" if s is None else f"{s['psnr_db']:.1f} / {s['adherence']:.3f}")
            lines.append(f"| {m} | " + " | ".join(row) + " |")
        lines.append("")
    return lines
