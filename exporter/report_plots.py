"""The pictures of report.html: matplotlib figures sized for the page (text at least MIN_TEXT_PX
on screen), frame grids (FP / quantized / amplified difference) and an animated comparison.
Every picture is returned as (base64 data, width in pixels)."""

from __future__ import annotations

import base64
import io
from typing import Any

import numpy as np
from PIL import Image

FIG_WIDTH_IN = 8.0
DPI = 100
PAGE_PX = 820  # the widest a picture may be: the page's content column (report.CONTENT_PX) minus margins
FONT_PT = 10  # every text in a figure; at DPI 100 one point is 100/72 px
MIN_TEXT_PX = 10
DIFF_GAIN = 4  # |FP - quantized| is shown multiplied by this
MAX_FRAMES = 8  # frames shown per row


def text_px(points: float) -> float:
    """On-screen pixels of a font size in points, for a figure shown at its natural size."""
    return points * DPI / 72


def _style() -> dict[str, float]:
    return {"font.size": FONT_PT, "axes.titlesize": FONT_PT + 1, "axes.labelsize": FONT_PT,
            "xtick.labelsize": FONT_PT, "ytick.labelsize": FONT_PT, "legend.fontsize": FONT_PT}  # fmt: skip


def _png(fig: Any) -> tuple[str, int]:
    import matplotlib.pyplot as plt

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=DPI, bbox_inches="tight")
    plt.close(fig)
    width = Image.open(io.BytesIO(buffer.getvalue())).width
    return base64.b64encode(buffer.getvalue()).decode(), width


def _figure(height_in: float) -> tuple[Any, Any]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    params: Any = plt.rcParams  # typed by key literals; the keys are matplotlib's own
    params.update(_style())
    return plt.subplots(figsize=(FIG_WIDTH_IN * 0.72, height_in))  # the legend outside takes the rest


def line_plot(
    series: dict[str, list[float]], xlabel: str, ylabel: str, title: str, log: bool = False
) -> tuple[str, int]:
    """One line per series, the legend outside the axes on the right."""
    fig, ax = _figure(3.4)
    for name, values in series.items():
        ax.plot(values, marker=".", label=name)
    ax.set(xlabel=xlabel, ylabel=ylabel, title=title)
    if log:
        ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend(loc="upper left", bbox_to_anchor=(1.02, 1.0), frameon=False)
    return _png(fig)


def heatmap(rows: list[str], table: np.ndarray, title: str) -> tuple[str, int]:
    """Rows x steps of SQNR (dB); NaN cells are grey ("not comparable")."""
    fig, ax = _figure(max(2.4, 0.28 * len(rows) + 1.0))
    import matplotlib.pyplot as plt

    cmap = plt.get_cmap("viridis").with_extremes(bad="#bbbbbb")
    image = ax.imshow(np.ma.masked_invalid(table), aspect="auto", cmap=cmap)
    ax.set_yticks(range(len(rows)), labels=rows)
    ax.set_xticks(range(0, table.shape[1], max(1, table.shape[1] // 10)))  # at most ~10 labels
    ax.set(xlabel="denoising step (0 = noisiest)", title=title)
    bar = fig.colorbar(image, ax=ax)
    bar.set_label("SQNR vs FP, dB (higher = closer)")
    return _png(fig)


def _encode(image: Image.Image, fmt: str, **kw: Any) -> tuple[str, int]:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **kw)
    return base64.b64encode(buffer.getvalue()).decode(), image.width


def _frames(pixels: np.ndarray) -> np.ndarray:
    """[F, H, W, 3] (an image is one frame), at most MAX_FRAMES evenly spaced."""
    frames = pixels if pixels.ndim == 4 else pixels[None]
    pick = np.unique(np.linspace(0, len(frames) - 1, min(MAX_FRAMES, len(frames))).round().astype(int))
    return frames[pick]


def _scale(width: int) -> int:
    return max(1, PAGE_PX // width)


def frame_row(pixels: np.ndarray) -> tuple[str, int]:
    """The chosen frames side by side, enlarged to fill the page width without passing it."""
    frames = _frames(pixels)
    strip = np.concatenate(list(frames), axis=1)
    scale = _scale(strip.shape[1])
    image = Image.fromarray(strip).resize((strip.shape[1] * scale, strip.shape[0] * scale), Image.Resampling.NEAREST)
    return _encode(image, "PNG")


def difference(fp: np.ndarray, quantized: np.ndarray) -> np.ndarray:
    """|FP − quantized| per pixel, multiplied by DIFF_GAIN, as uint8."""
    diff = np.abs(fp.astype(np.int16) - quantized.astype(np.int16)) * DIFF_GAIN
    return np.clip(diff, 0, 255).astype(np.uint8)


def animation(fp: np.ndarray, quantized: np.ndarray) -> tuple[str, int]:
    """An animated GIF: FP and quantized side by side, every frame of the clip."""
    pairs = np.concatenate([fp, np.full_like(fp[..., :2, :], 255), quantized], axis=-2)  # a white gap
    scale = max(1, min(4, PAGE_PX // pairs.shape[-2]))
    images = [Image.fromarray(f).resize((f.shape[1] * scale, f.shape[0] * scale), Image.Resampling.NEAREST)
              for f in pairs]  # fmt: skip
    return _encode(images[0], "GIF", save_all=True, append_images=images[1:], duration=125, loop=0)
