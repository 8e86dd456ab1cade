"""Summaries of a .qstats file: the widest layers, the step where each is widest, and a plot of
one layer's range across steps (activation ranges move with the denoising step)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from qexport.calib.store import QStats

from qexport.errors import QexportError


@dataclass(frozen=True, kw_only=True)
class LayerRange:
    name: str
    channels: int
    lo: float  # min over steps
    hi: float  # max over steps
    widest_step: int
    spread: float  # widest step's range / narrowest step's range


def layer_ranges(stats: QStats) -> list[LayerRange]:
    """Every layer, widest (max |x| over all steps) first."""
    rows = []
    for name, s in stats.layers.items():
        width = s.maximum.astype(np.float64) - s.minimum.astype(np.float64)
        rows.append(
            LayerRange(
                name=name,
                channels=s.channels,
                lo=float(s.minimum.min()),
                hi=float(s.maximum.max()),
                widest_step=int(np.argmax(width)),
                spread=float(width.max() / max(width.min(), 1e-12)),
            )
        )
    return sorted(rows, key=lambda r: -max(abs(r.lo), abs(r.hi)))


def plot_layer(stats: QStats, layer: str, path: Path) -> None:
    """PNG of one layer's per-step min/max and mean per-channel max |x| across denoising steps."""
    if layer not in stats.layers:
        close = [n for n in stats.layers if layer.split(".")[-1] in n][:5]
        raise QexportError(
            f"layer {layer!r} is not in the statistics; e.g. {', '.join(close or list(stats.layers)[:5])}"
        )
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from qexport.media import atomic_write

    s = stats.layers[layer]
    steps = np.arange(s.steps)
    fig, ax = plt.subplots(figsize=(7, 3.5), dpi=100)
    ax.fill_between(steps, s.minimum, s.maximum, alpha=0.25, label="min..max")
    ax.plot(steps, s.maximum, label="max")
    ax.plot(steps, s.minimum, label="min")
    ax.plot(steps, s.absmax_mean.max(axis=1), "--", label="widest channel, mean max|x|")
    ax.plot(steps, np.median(s.absmax_mean, axis=1), ":", label="median channel, mean max|x|")
    ax.set_xlabel("denoising step (0 = noisiest)")
    ax.set_ylabel("activation")
    ax.set_title(f"{stats.model_id}: {layer}", fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    atomic_write(Path(path), lambda p: fig.savefig(p, format="png"))
    plt.close(fig)
