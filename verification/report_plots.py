"""The pictures of report.html: matplotlib figures of a fixed pixel width (text at least
MIN_TEXT_PX on screen), frame strips (FP / quantized / amplified difference) and an animated
comparison. Every picture is returned as a Picture (base64 data, pixel size, text size)."""

from __future__ import annotations

import base64
import io
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image

DPI = 100
FIG_WIDTH_IN = 8.0  # every figure is exactly FIG_WIDTH_IN * DPI pixels wide (constrained layout, no trimming)
PAGE_PX = 820  # the widest a picture may be: the page's content column at a 900 px viewport
FONT_PT = 10  # every text in a figure; at DPI 100 one point is 100/72 px
MIN_TEXT_PX = 10
DIFF_GAIN = 4  # |FP - quantized| is shown multiplied by this
MAX_FRAMES = 8  # frames shown per strip
IMAGE_MAX_PX = 320  # an image model's frame is enlarged to at most this many pixels a side
GIF_SCALE = 8  # the animation's enlargement, at most (it also stays within PAGE_PX)
FOLDED = "#bbbbbb"  # heatmap cells that are not comparable with FP


@dataclass(frozen=True, kw_only=True)
class Picture:
    """One embedded picture: base64 PNG / GIF data, its pixel size, and its smallest text in pixels
    at natural size (None for pictures without text)."""

    data: str
    width: int
    height: int
    kind: str = "png"
    text_px: float | None = None


def text_px(points: float) -> float:
    """Pixels of a font size in points in a figure saved at DPI (its natural size)."""
    return points * DPI / 72


def displayed_text_px(points: float, picture_px: int, container_px: int) -> float:
    """On-screen pixels of that text once a picture of picture_px is fitted into container_px."""
    return text_px(points) * min(1.0, container_px / picture_px)


def style() -> dict[str, float]:
    """The matplotlib font sizes (points) every report figure uses."""
    return {"font.size": FONT_PT, "axes.titlesize": FONT_PT + 1, "axes.labelsize": FONT_PT,
            "xtick.labelsize": FONT_PT, "ytick.labelsize": FONT_PT, "legend.fontsize": FONT_PT,
            "figure.titlesize": FONT_PT + 1}  # fmt: skip


def smallest_font_pt(fig: Any) -> float:
    """The smallest font size (points) of any visible text in a figure."""
    from matplotlib.text import Text

    texts = [t for t in fig.findobj(Text) if t.get_visible() and t.get_text().strip()]
    return min(float(t.get_fontsize()) for t in texts)


def _figure(height_in: float) -> tuple[Any, Any]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    params: Any = plt.rcParams  # typed by key literals; the keys are matplotlib's own
    params.update(style())
    return plt.subplots(figsize=(FIG_WIDTH_IN, height_in), dpi=DPI, layout="constrained")


def render(fig: Any) -> Picture:
    """The figure as a PNG Picture at DPI; the figure is closed."""
    import matplotlib.pyplot as plt

    smallest = smallest_font_pt(fig)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=DPI)
    plt.close(fig)
    size = Image.open(io.BytesIO(buffer.getvalue())).size
    return Picture(data=base64.b64encode(buffer.getvalue()).decode(), width=size[0], height=size[1],
                   text_px=text_px(smallest))  # fmt: skip


def line_figure(series: dict[str, list[float]], xlabel: str, ylabel: str, title: str, log: bool = False) -> Any:
    """One line per series over integer steps; the legend below the axes, outside the lines."""
    from matplotlib.ticker import LogFormatter, MaxNLocator

    fig, ax = _figure(3.0 + 0.22 * ((len(series) + 1) // 2))
    for name, values in series.items():
        ax.plot(values, marker=".", label=name)
    ax.set(xlabel=xlabel, ylabel=ylabel, title=title)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    if log:
        ax.set_yscale("log")
        ax.yaxis.set_major_formatter(LogFormatter(labelOnlyBase=False))
        ax.yaxis.set_minor_formatter(LogFormatter(labelOnlyBase=False, minor_thresholds=(2, 0.6)))
    ax.grid(alpha=0.3, which="both")
    fig.legend(loc="outside lower center", ncols=min(2, len(series)), frameon=False)
    return fig


def line_plot(series: dict[str, list[float]], xlabel: str, ylabel: str, title: str, log: bool = False) -> Picture:
    """line_figure as a Picture."""
    return render(line_figure(series, xlabel, ylabel, title, log))


def heatmap_figure(rows: list[str], table: np.ndarray, title: str, grey_label: str) -> Any:
    """Rows x steps of SQNR (dB) on a labelled colour scale; all-NaN rows are grey, labelled grey_label."""
    from matplotlib.ticker import MaxNLocator

    fig, ax = _figure(1.2 + 0.26 * len(rows))
    import matplotlib.pyplot as plt

    cmap = plt.get_cmap("viridis").with_extremes(bad=FOLDED)
    image = ax.imshow(np.ma.masked_invalid(table), aspect="auto", cmap=cmap, interpolation="nearest")
    ax.set_yticks(range(len(rows)), labels=rows)
    ax.xaxis.set_major_locator(MaxNLocator(nbins=10, integer=True))
    ax.set(xlabel="denoising step (0 = noisiest)", title=title)
    for i, row in enumerate(table):
        if np.isnan(row).all():
            ax.text((table.shape[1] - 1) / 2, i, grey_label, ha="center", va="center", fontsize=FONT_PT)
    bar = fig.colorbar(image, ax=ax, pad=0.02)
    bar.set_label("SQNR vs FP, dB\n(yellow = closer to FP)")
    return fig


def heatmap(rows: list[str], table: np.ndarray, title: str, grey_label: str = "folded: not comparable") -> Picture:
    """heatmap_figure as a Picture."""
    return render(heatmap_figure(rows, table, title, grey_label))


def colour_of(value: float, low: float, high: float) -> tuple[str, str]:
    """The heatmap's background colour (hex) for value on the scale low..high (FOLDED for NaN), and the
    text colour that reads on it (black on light, white on dark)."""
    import matplotlib.pyplot as plt
    from matplotlib.colors import to_hex

    if np.isnan(value):
        return FOLDED, "#000000"
    rgba = plt.get_cmap("viridis")(float(np.clip((value - low) / max(high - low, 1e-9), 0, 1)))
    light = 0.2126 * rgba[0] + 0.7152 * rgba[1] + 0.0722 * rgba[2] > 0.45
    return str(to_hex(rgba)), "#000000" if light else "#ffffff"


def _encode(images: list[Image.Image], fmt: str, **kw: Any) -> Picture:
    buffer = io.BytesIO()
    images[0].save(buffer, format=fmt, **({"save_all": True, "append_images": images[1:]} if len(images) > 1 else {}),
                   **kw)  # fmt: skip
    return Picture(data=base64.b64encode(buffer.getvalue()).decode(), width=images[0].width,
                   height=images[0].height, kind=fmt.lower())  # fmt: skip


def shown_frames(pixels: np.ndarray) -> list[int]:
    """The indexes of the frames a strip shows: at most MAX_FRAMES, evenly spaced ([0] for an image)."""
    count = len(pixels) if pixels.ndim == 4 else 1
    return [int(i) for i in np.unique(np.linspace(0, count - 1, min(MAX_FRAMES, count)).round())]


def _enlarge(array: np.ndarray, scale: int) -> Image.Image:
    image = Image.fromarray(array)
    return image.resize((image.width * scale, image.height * scale), Image.Resampling.NEAREST)


def frame_row(pixels: np.ndarray) -> Picture:
    """A clip's shown frames side by side (a white gap between them), enlarged to fill the page width
    without passing it; an image alone, enlarged to at most IMAGE_MAX_PX a side."""
    if pixels.ndim == 3:
        h, w = pixels.shape[:2]
        return _encode([_enlarge(pixels, max(1, min(PAGE_PX // w, IMAGE_MAX_PX // max(h, w))))], "PNG")
    frames = pixels[shown_frames(pixels)]
    w = frames.shape[2]
    scale = max(1, (PAGE_PX - 2 * (len(frames) - 1)) // (w * len(frames)))
    gap = np.full((frames.shape[1] * scale, 2, 3), 255, np.uint8)
    parts = [np.asarray(_enlarge(f, scale)) for f in frames]
    strip = np.concatenate([x for p in parts for x in (p, gap)][:-1], axis=1)
    return _encode([Image.fromarray(strip)], "PNG")


def difference(fp: np.ndarray, quantized: np.ndarray) -> np.ndarray:
    """|FP − quantized| per pixel, multiplied by DIFF_GAIN, as uint8."""
    diff = np.abs(fp.astype(np.int16) - quantized.astype(np.int16)) * DIFF_GAIN
    return np.clip(diff, 0, 255).astype(np.uint8)


def animation(fp: np.ndarray, quantized: np.ndarray) -> Picture:
    """An animated GIF of every frame: FP on the left, quantized on the right, a white gap between."""
    pairs = np.concatenate([fp, np.full_like(fp[..., :4, :], 255), quantized], axis=-2)
    scale = max(1, min(GIF_SCALE, PAGE_PX // pairs.shape[-2]))
    return _encode([_enlarge(f, scale) for f in pairs], "GIF", duration=125, loop=0)
