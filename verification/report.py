"""report.html: one self-contained page for an evaluation, meant to be forwarded: the build's
target, options, recipe and verification verdict and the headline numbers against FP at the top
(report_summary), then readable plots and frames (report_plots), each section with a short
"how to read this". Reads the evaluation's and the builds' JSON; runs nothing."""

from __future__ import annotations

import html
import re
from pathlib import Path
from typing import Any

import numpy as np
from qexport.calib.store import QStats
from qexport.verification import report_plots as plots
from qexport.verification import report_summary as summary

from qexport.media import atomic_write

CONTENT_PX = 860  # the content column's widest; at a 900 px viewport it is 900 - 2 * 20 = 860 (PAGE_PX + room)
STYLE = f"""
*{{box-sizing:border-box}}
body{{font-family:system-ui,sans-serif;font-size:16px;line-height:1.45;margin:0;color:#222;overflow-wrap:anywhere}}
main{{max-width:{CONTENT_PX + 40}px;margin:0 auto;padding:16px 20px}}
img{{max-width:100%;height:auto;display:block}} img.px{{image-rendering:pixelated}}
table{{border-collapse:collapse;margin:8px 0;font-size:15px}}
td,th{{border:1px solid #ccc;padding:4px 8px;text-align:right;overflow-wrap:normal}}
th:first-child,td:first-child{{text-align:left}} .scroll{{overflow-x:auto;max-width:100%}}
table.kv td:last-child{{text-align:left}} table.cells td{{font-size:13px;padding:2px 4px}}
.verdict{{font-weight:bold;padding:2px 8px;border-radius:4px}} .pass{{background:#d8f0d8}} .fail{{background:#f5d0d0}}
pre{{font-size:13px;background:#f6f6f6;padding:8px;overflow-x:auto;max-width:100%}}
.how{{color:#444;font-size:15px;background:#f4f7fb;padding:6px 10px;border-left:3px solid #9ab}}
figure{{margin:8px 0}} figcaption{{font-size:14px;color:#444}}
"""


def _img(picture: plots.Picture, alt: str) -> str:
    pixelated = " class='px'" if picture.text_px is None else ""  # frames stay sharp; plots are smoothed
    text = f" data-text-px='{picture.text_px:.1f}'" if picture.text_px is not None else ""
    return (f"<img{pixelated} src='data:image/{picture.kind};base64,{picture.data}' width='{picture.width}' "
            f"height='{picture.height}'{text} alt='{html.escape(alt)}'>")  # fmt: skip


def _figure(picture: plots.Picture, alt: str, caption: str) -> str:
    return f"<figure>{_img(picture, alt)}<figcaption>{caption}</figcaption></figure>"


def _how(text: str) -> str:
    return f"<p class='how'><b>How to read this.</b> {text}</p>"


def role_of(layer: str) -> str:
    """A layer's role: its name without the block index, the block kind kept ("temporal attn1.to_q")."""
    match = re.match(r"^(.*?)blocks\.\d+\.(.+)$", layer)
    if not match:
        return layer
    kind = match.group(1).replace("transformer_", "").strip("_.")
    return f"{kind} {match.group(2)}" if kind else match.group(2)


def role_table(layers: list[str], table: np.ndarray) -> tuple[list[str], np.ndarray]:
    """Rows grouped by layer role (role_of), averaged over blocks; a role with no comparable cell stays NaN."""
    roles: dict[str, list[np.ndarray]] = {}
    for name, row in zip(layers, table, strict=True):
        roles.setdefault(role_of(name), []).append(row)
    with np.errstate(all="ignore"):
        means = [np.full(table.shape[1], np.nan) if np.isnan(rows).all() else np.nanmean(rows, axis=0)
                 for rows in roles.values()]  # fmt: skip
    return list(roles), np.array(means)


def _cells_table(layers: list[str], table: np.ndarray) -> str:
    low, high = float(np.nanmin(table)), float(np.nanmax(table))
    head = "<tr><th>layer</th>" + "".join(f"<th>{k}</th>" for k in range(table.shape[1])) + "</tr>"
    rows = []
    for layer, row in zip(layers, table, strict=True):
        colours = [plots.colour_of(v, low, high) for v in row]
        cells = "".join(f"<td style='background:{bg};color:{fg}'>{'–' if np.isnan(v) else f'{v:.1f}'}</td>"
                        for v, (bg, fg) in zip(row, colours, strict=True))  # fmt: skip
        rows.append(f"<tr><td>{html.escape(layer)}</td>{cells}</tr>")
    scale = (
        f"<p>Coloured from {low:.1f} dB (dark blue) to {high:.1f} dB (yellow); columns are steps; "
        "– is a folded value projection.</p>"
    )
    return f"{scale}<div class='scroll'><table class='cells'>{head}{''.join(rows)}</table></div>"


HEATMAP_HOW = (
    "Each cell feeds a quantized linear the FP model's own input at that step, through the build's simulated "
    "quantization, and compares its output with FP's (SQNR, dB; 6 dB is one bit). Rows are layer roles averaged "
    "over the blocks; the collapsible table below has every layer. Grey rows are value projections (to_v) into "
    "which the build folded the next linear's transform (smoothing's 1/s, the channel shift or a head rotation): "
    "their output is rescaled on purpose and would read only a few dB against FP, which says nothing about "
    "accuracy; their error shows in the row of the attention output linear. Cross-attention keys read the "
    "caption embedding, the same at every step, so their row is flat. A row that darkens at some steps is "
    "where per-step scales (TSW) matter; the last, least noisy steps carry fine texture and are usually darkest."
)


def _layers_section(name: str, layers: list[str], table: np.ndarray) -> str:
    roles, means = role_table(layers, table)
    picture = plots.heatmap(roles, means, f"per-layer output SQNR, averaged over blocks: {Path(name).name}")
    caption = ("Colour: SQNR of each quantized linear's output against FP in dB, on the scale at the right: yellow "
               "is close to FP, dark blue is far. Grey, labelled: folded, not comparable (see below).")  # fmt: skip
    return (
        f"<h2>Per layer and step: {html.escape(Path(name).name)}</h2>{_figure(picture, 'heatmap', caption)}"
        + _how(HEATMAP_HOW)
        + f"<details><summary>every layer ({len(layers)} rows, SQNR in dB)</summary>{_cells_table(layers, table)}"
        "</details>"
    )


def _frames_section(result: dict[str, Any], samples: dict[str, np.ndarray]) -> str:
    fp = samples["FP"]
    video = fp.ndim == 4
    shown = plots.shown_frames(fp)
    which = f", frames {', '.join(map(str, shown))} of {len(fp)}" if video else ""
    parts = [f"<h2>Frames: {html.escape(result['prompts'][0])}, seed {result['seeds'][0]}</h2>"]
    for name, pixels in samples.items():
        if name == "FP":
            continue
        label = html.escape(Path(name).name)
        rows = [(f"FP{which}", fp), (f"{label} (quantized){which}", pixels),
                (f"|FP − {label}| × {plots.DIFF_GAIN} (black = identical)", plots.difference(fp, pixels))]  # fmt: skip
        parts += [_figure(plots.frame_row(row), title, title) for title, row in rows]
        if video:
            parts.append(_figure(plots.animation(fp, pixels), "animation",
                                 f"animated, all {len(fp)} frames: FP (left), {label} (right)"))  # fmt: skip
    parts.append(_how(f"The first prompt and seed: FP, the build sampled from the same noise, and their absolute "
                      f"difference per pixel multiplied by {plots.DIFF_GAIN}, so black is identical and a bright "
                      "pixel differs by a quarter of its range or more. Scattered single pixels are rounding noise "
                      "in the background texture; a colour cast or a missing or displaced shape is a real failure"
                      + (", and so is a different motion in the animation." if video else ".")))  # fmt: skip
    return "".join(parts)


def _ranges_section(stats: QStats, top: int = 6) -> str:
    reach = {n: [float(v) for v in np.maximum(-s.minimum, s.maximum)] for n, s in stats.layers.items()}
    series: dict[str, list[float]] = {}
    for name in sorted(reach, key=lambda n: -max(reach[n])):
        values = reach[name]
        same = next((k for k, v in series.items() if v == values), None)  # q, k and v read one input
        if same is not None:
            series[f"{same}, {name.rsplit('.', 1)[-1]}"] = series.pop(same)
        elif len(series) < top:
            series[name] = values
    picture = plots.line_plot(series, "denoising step (0 = noisiest)", "max |x| per step (log)",
                              "widest layer inputs", log=True)  # fmt: skip
    caption = "Colour: one layer input each (legend below); layers that read the same input share one line."
    return ("<h2>Activation ranges move with the step</h2>" + _figure(picture, "ranges", caption)
            + _how("The calibrated range (largest |x|) of the widest layer inputs at each step, on a log scale. "
                   "Where a line moves by a large factor across the steps, one static scale for all steps wastes "
                   "levels at the steps where it is small: per-step models (TSW) give each step its own."))  # fmt: skip


def _steps_section(result: dict[str, Any]) -> str:
    series = {Path(n).name: s["step_sqnr_db"] for n, s in result["builds"].items() if s.get("step_sqnr_db")}
    if not series:
        return ""
    picture = plots.line_plot(series, "denoising step (0 = noisiest)", "SQNR vs FP, dB", "denoiser output per step")
    caption = "Colour: one build each (legend below); higher is closer to FP."
    return ("<h2>Per-step error</h2>" + _figure(picture, "per-step error", caption)
            + _how("Each emitted model is fed the FP trajectory's input at its step, and its output is compared "
                   "with FP's (SQNR, dB; each 6 dB is one bit). Errors made at early steps are carried through the "
                   "rest of the loop, so a low value early costs more than one late."))  # fmt: skip


def _top(result: dict[str, Any], manifests: dict[str, dict[str, Any]]) -> list[str]:
    first = next(iter(manifests.values()), {})
    scope = (f"{len(result['builds'])} build(s) against FP on {len(result['prompts'])} prompt(s) × "
             f"{len(result['seeds'])} seed(s), {len(first.get('steps', []))} denoising steps, "
             f"CFG {first.get('cfg', '-')}")  # fmt: skip
    return [
        f"<h1>qexport report: {html.escape(result['model_id'])}</h1><p>{html.escape(scope)}.</p>",
        "<h2>Headline numbers against FP</h2>", summary.headline(result), _how(summary.how_headline(result)),
        "<h2>Builds</h2>", *[summary.build_card(n, m) for n, m in manifests.items()],
        _how("Options summarise what the build did; the recipe is all of it (qexport build --recipe reads the same "
             "text). The target decides storage types and what must run on integer kernels. Verification ran every "
             "emitted model in the runtime: it passes when every quantized layer runs an integer kernel and each "
             "model's output agrees with the build's own simulation (cosine above the floor, the largest difference "
             "within its LSB bound); SQNR vs FP and the end-to-end numbers are reported, not judged."),
    ]  # fmt: skip


def write_report(
    path: Path,
    result: dict[str, Any],
    samples: dict[str, np.ndarray],
    manifests: dict[str, dict[str, Any]],
    stats: QStats | None = None,
    heatmaps: dict[str, tuple[list[str], np.ndarray]] | None = None,
) -> None:
    """Write the self-contained HTML report atomically.

    Args:
        path: where report.html goes.
        result: an evaluation's JSON (verification.evaluate.EvalResult.to_json()).
        samples: "FP" and each build -> the first sample's pixels ([F, H, W, 3] or [H, W, 3], uint8).
        manifests: each build -> its manifest.json (target, quantization, recipe, verification).
        stats: the calibration, for the activation-range plot (left out when None).
        heatmaps: each build -> (layers, [layers, steps] SQNR) from evaluate.layer_step_sqnr.
    """
    title = f"qexport report: {html.escape(result['model_id'])}"
    parts = [
        "<!doctype html><html lang='en'><meta charset='utf-8'><meta name='viewport' content='width=device-width'>",
        f"<title>{title}</title><style>{STYLE}</style><main>", *_top(result, manifests), _steps_section(result),
        _ranges_section(stats) if stats is not None else "",
        *[_layers_section(name, layers, table) for name, (layers, table) in (heatmaps or {}).items()],
        _frames_section(result, samples), "</main></html>",
    ]  # fmt: skip
    atomic_write(Path(path), lambda p: Path(p).write_text("\n".join(parts)))
