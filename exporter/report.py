"""report.html: one self-contained page (plots as embedded PNG) for an evaluation: the metrics
table, activation ranges across steps, per-layer x per-step SQNR, per-step error curves, and
frame strips FP vs each build."""

from __future__ import annotations

import base64
import html
import io
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from qexport.calib.store import QStats

from qexport.media import atomic_write
from qexport.summaries import eval_table


def _png(fig: Any) -> str:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100, bbox_inches="tight")
    import matplotlib.pyplot as plt

    plt.close(fig)
    return base64.b64encode(buffer.getvalue()).decode()


def _img(array: np.ndarray, scale: int = 3) -> str:
    frames = array if array.ndim == 4 else array[None]
    strip = np.concatenate(list(frames), axis=1)
    image = Image.fromarray(strip).resize((strip.shape[1] * scale, strip.shape[0] * scale), Image.Resampling.NEAREST)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def _ranges_plot(stats: QStats, top: int = 6) -> str:
    import matplotlib.pyplot as plt

    widest = sorted(
        stats.layers, key=lambda n: -float(np.abs([stats.layers[n].minimum, stats.layers[n].maximum]).max())
    )
    fig, ax = plt.subplots(figsize=(8, 3.5))
    for name in widest[:top]:
        s = stats.layers[name]
        ax.plot(np.maximum(-s.minimum, s.maximum), label=name, marker=".")
    ax.set_xlabel("denoising step (0 = noisiest)")
    ax.set_ylabel("max |x| per step")
    ax.set_yscale("log")
    ax.set_title("activation range across steps, widest layers")
    ax.legend(fontsize=6)
    return _png(fig)


def _heatmap(name: str, layers: list[str], table: np.ndarray) -> str:
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, max(3.0, 0.12 * len(layers))))
    im = ax.imshow(table, aspect="auto", cmap="viridis")
    ax.set_yticks(range(len(layers)), labels=layers, fontsize=4)
    ax.set_xlabel("denoising step")
    ax.set_title(f"per-layer output SQNR (dB), simulated vs FP: {name}", fontsize=9)
    fig.colorbar(im, ax=ax)
    return _png(fig)


def _curves(result: dict[str, Any]) -> str:
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 3.5))
    for name, s in result["builds"].items():
        ax.plot(s["step_sqnr_db"], marker=".", label=Path(name).name)
    ax.set_xlabel("denoising step")
    ax.set_ylabel("denoiser output SQNR vs FP (dB)")
    ax.set_title("per-step error (each model fed the FP trajectory)")
    ax.legend(fontsize=7)
    return _png(fig)


def write_report(
    path: Path,
    result: dict[str, Any],
    samples: dict[str, np.ndarray],
    stats: QStats | None = None,
    heatmaps: dict[str, tuple[list[str], np.ndarray]] | None = None,
) -> None:
    """Write the self-contained HTML report atomically."""
    import matplotlib

    matplotlib.use("Agg")
    parts = [
        "<!doctype html><meta charset='utf-8'><title>qexport report</title>",
        "<style>body{font-family:sans-serif;max-width:1000px;margin:auto} pre{font-size:12px}</style>",
        f"<h1>qexport: {html.escape(result['model_id'])}</h1>",
        f"<p>{len(result['prompts'])} prompts x seeds {result['seeds']}, all builds from the same noise as FP.</p>",
        "<pre>" + html.escape("\n".join(eval_table(result))) + "</pre>",
    ]
    if stats is not None:
        parts.append(
            f"<h2>Activation ranges move with the step</h2><img src='data:image/png;base64,{_ranges_plot(stats)}'>"
        )
    parts.append(f"<h2>Per-step error</h2><img src='data:image/png;base64,{_curves(result)}'>")
    for name, (layers, table) in (heatmaps or {}).items():
        parts.append(f"<h2>Per layer and step: {html.escape(Path(name).name)}</h2>")
        parts.append(f"<img src='data:image/png;base64,{_heatmap(Path(name).name, layers, table)}'>")
    parts.append(f"<h2>Frames ({html.escape(result['prompts'][0])}, seed {result['seeds'][0]})</h2>")
    for name, pixels in samples.items():
        parts.append(f"<p>{html.escape(Path(name).name)}</p><img src='data:image/png;base64,{_img(pixels)}'>")
    atomic_write(Path(path), lambda p: Path(p).write_text("\n".join(parts)))
