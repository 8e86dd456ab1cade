"""report.html: one self-contained page for an evaluation, meant to be forwarded: the build's
recipe, target and verification verdict, the headline numbers against FP with their standard
errors, readable plots, frames (FP / quantized / difference, and an animation), and a short
"how to read this" under each section. Pictures are embedded (report_plots)."""

from __future__ import annotations

import html
import re
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from qexport.calib.store import QStats
from qexport.exporter import report_plots as plots

from qexport.media import atomic_write

CONTENT_PX = 860  # the page's content column; every picture is at most report_plots.PAGE_PX wide
STYLE = f"""
body{{font-family:system-ui,sans-serif;font-size:16px;line-height:1.45;margin:0;color:#222}}
main{{max-width:{CONTENT_PX}px;margin:0 auto;padding:16px 20px}}
img{{max-width:100%;height:auto;image-rendering:pixelated;display:block}}
table{{border-collapse:collapse;margin:8px 0;font-size:15px}}
td,th{{border:1px solid #ccc;padding:4px 8px;text-align:right}}
th:first-child,td:first-child{{text-align:left}} .scroll{{overflow-x:auto;max-width:100%}}
.verdict{{font-weight:bold;padding:2px 8px;border-radius:4px}} .pass{{background:#d8f0d8}} .fail{{background:#f5d0d0}}
pre{{font-size:13px;background:#f6f6f6;padding:8px;overflow-x:auto;max-width:100%}}
.how{{color:#555;font-size:15px}} figure{{margin:8px 0}} figcaption{{font-size:14px;color:#555}}
"""


def _img(data: tuple[str, int], alt: str, kind: str = "png") -> str:
    return f"<img src='data:image/{kind};base64,{data[0]}' width='{data[1]}' alt='{html.escape(alt)}'>"


def _how(text: str) -> str:
    return f"<p class='how'><b>How to read this.</b> {text}</p>"


def _num(value: Any, digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _headline(result: dict[str, Any]) -> str:
    fp = result["fp"]
    rows = ["<tr><th>build</th><th>PSNR vs FP, dB (± s.e.)</th><th>SSIM</th><th>adherence (FP "
            f"{_num(fp.get('adherence'), 3)})</th><th>ms / step</th><th>MiB on disk</th></tr>"]  # fmt: skip
    for name, s in result["builds"].items():
        psnr = f"{_num(s.get('psnr_db'))} ± {_num(s.get('psnr_se_db'))}"
        rows.append(f"<tr><td>{html.escape(Path(name).name)}</td><td>{psnr}</td><td>{_num(s.get('ssim'), 3)}</td>"
                    f"<td>{_num(s.get('adherence'), 3)}</td><td>{_num(s.get('step_ms'), 0)}</td>"
                    f"<td>{_num(s.get('model_mib'))}</td></tr>")  # fmt: skip
    samples = len(result["prompts"]) * len(result["seeds"])
    return (
        "<h2>Accuracy against FP</h2><div class='scroll'><table>" + "".join(rows) + "</table></div>"
        + _how(f"Each build and the FP model sample the same {samples} prompt × seed pairs from the same noise. "
               "PSNR and SSIM compare the final frames with FP's (higher is closer; ± is the standard error of "
               "the mean over the samples, so two builds whose difference is within about two standard errors "
               "are not told apart). Adherence is the share of samples whose colour, shape and motion the "
               "judge recognises, next to FP's own.")
    )  # fmt: skip


def _build_section(name: str, manifest: dict[str, Any]) -> str:
    recipe = manifest.get("recipe")
    text = yaml.safe_dump(recipe, sort_keys=False) if recipe else "(built by an older qexport: no recipe recorded)"
    v = manifest.get("verification") or {}
    if v:
        ok = bool(v.get("ok"))
        models = v.get("models", [])
        integer = sum(m.get("integer", 0) for m in models)
        e2e = v.get("end_to_end") or {}
        loop = f"; end to end PSNR {e2e['psnr_db']:.2f} dB" if "psnr_db" in e2e else ""
        verdict = (f"<span class='verdict {'pass' if ok else 'fail'}'>{'PASS' if ok else 'FAIL'}</span> "
                   f"{len(models)} model(s) verified on {html.escape(str(v.get('runtime', 'onnxruntime')))}, "
                   f"{integer} quantized layer-models on integer kernels{loop}")  # fmt: skip
    else:
        verdict = "<span class='verdict fail'>NOT VERIFIED</span> run qexport verify on this build"
    return (
        f"<h3>{html.escape(Path(name).name)}: target {html.escape(str(manifest.get('target')))}, "
        f"{len(manifest.get('ranges', []))} model(s)</h3><p>Verification: {verdict}</p>"
        f"<details><summary>recipe</summary><pre>{html.escape(text)}</pre></details>"
    )


def role_table(layers: list[str], table: np.ndarray) -> tuple[list[str], np.ndarray]:
    """Rows grouped by layer role (the name without its block index), averaged over blocks."""
    roles: dict[str, list[np.ndarray]] = {}
    for name, row in zip(layers, table, strict=True):
        match = re.match(r"^.*?blocks\.\d+\.(.+)$", name)
        roles.setdefault(match.group(1) if match else name, []).append(row)
    names = list(roles)
    with np.errstate(all="ignore"):
        means = [np.full(table.shape[1], np.nan) if np.isnan(rows).all() else np.nanmean(rows, axis=0)
                 for rows in roles.values()]  # fmt: skip
    return names, np.array(means)


def _layers_section(name: str, layers: list[str], table: np.ndarray) -> str:
    roles, means = role_table(layers, table)
    figure = plots.heatmap(roles, means, f"per-layer output SQNR by role: {Path(name).name}")
    cells = "".join(
        f"<tr><td>{html.escape(layer)}</td>" + "".join(f"<td>{_num(v, 1)}</td>" for v in row) + "</tr>"
        for layer, row in zip(layers, table, strict=True)
    )
    head = "<tr><th>layer</th>" + "".join(f"<th>{k}</th>" for k in range(table.shape[1])) + "</tr>"
    return (
        f"<h2>Per layer and step: {html.escape(Path(name).name)}</h2><figure>{_img(figure, 'heatmap')}"
        "<figcaption>Colour: SQNR of each quantized linear's output against FP, in dB, averaged over the blocks; "
        "yellow is close to FP, dark blue far. Grey: not comparable (see below).</figcaption></figure>"
        + _how("Each cell feeds the FP model's own input at that step through the build's simulated quantized "
               "layer and compares its output with FP's. Value projections (to_v) are grey when smoothing, the "
               "channel shift or a head rotation is folded into them: their output is then divided by the next "
               "linear's smoothing vector (shifted, rotated) on purpose, so it cannot be compared with FP's; the "
               "error they add shows in the row of the attention output linear. Cross-attention keys and values "
               "read the caption embedding, the same at every step, so their rows do not change along the steps. "
               "A row that darkens towards some steps is where per-step scales matter.")
        + f"<details><summary>every layer ({len(layers)} rows)</summary><div class='scroll'><table>{head}{cells}"
        "</table></div></details>"
    )  # fmt: skip


def _frames_section(result: dict[str, Any], samples: dict[str, np.ndarray]) -> str:
    fp = samples["FP"]
    parts = [f"<h2>Frames: {html.escape(result['prompts'][0])!s}, seed {result['seeds'][0]}</h2>"]
    video = fp.ndim == 4
    for name, pixels in samples.items():
        if name == "FP":
            continue
        label = html.escape(Path(name).name)
        rows = [("FP", fp), (label, pixels), (f"|FP − {label}| × {plots.DIFF_GAIN}", plots.difference(fp, pixels))]
        for title, row in rows:
            parts.append(f"<figure>{_img(plots.frame_row(row), title)}<figcaption>{title}</figcaption></figure>")
        if video:
            parts.append(f"<figure>{_img(plots.animation(fp, pixels), 'animation', 'gif')}"
                         f"<figcaption>animated: FP (left) and {label} (right)</figcaption></figure>")  # fmt: skip
    shown = f"up to {plots.MAX_FRAMES} evenly spaced frames of the clip" if video else "the image"
    parts.append(_how(f"The first prompt and seed, {shown}: FP, the build from the same noise, and their absolute "
                      f"difference multiplied by {plots.DIFF_GAIN} (black = identical). Differences concentrate on "
                      "edges and moving objects; a colour cast or a shape that is missing is a failure."))  # fmt: skip
    return "".join(parts)


def _ranges_section(stats: QStats, top: int = 6) -> str:
    reach = {n: float(np.abs([s.minimum, s.maximum]).max()) for n, s in stats.layers.items()}
    widest = sorted(stats.layers, key=lambda n: -reach[n])
    series = {n: list(np.maximum(-stats.layers[n].minimum, stats.layers[n].maximum)) for n in widest[:top]}
    figure = plots.line_plot(series, "denoising step (0 = noisiest)", "max |x| per step", "widest layer inputs",
                             log=True)  # fmt: skip
    return ("<h2>Activation ranges move with the step</h2>" + _img(figure, "ranges")
            + _how("The calibrated range of the widest layer inputs at each step (log scale), one colour per "
                   "layer (legend on the right). Where a line moves by a large factor across steps, one static "
                   "scale for all steps wastes levels: per-step models (TSW) give each step its own."))  # fmt: skip


def _steps_section(result: dict[str, Any]) -> str:
    series = {Path(n).name: s["step_sqnr_db"] for n, s in result["builds"].items() if s.get("step_sqnr_db")}
    if not series:
        return ""
    figure = plots.line_plot(series, "denoising step (0 = noisiest)", "SQNR vs FP (dB)", "denoiser output per step")
    return ("<h2>Per-step error</h2>" + _img(figure, "per-step error")
            + _how("Each emitted model is fed the FP trajectory's input at its step, and its output is compared "
                   "with FP's (one colour per build). Errors made at early steps are carried through the rest of "
                   "the loop, so a low value early costs more than one late."))  # fmt: skip


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
        result: an evaluation's JSON (exporter.evaluate.EvalResult.to_json()).
        samples: "FP" and each build -> the first sample's pixels.
        manifests: each build -> its manifest.json (recipe, target, verification).
        heatmaps: each build -> (layers, [layers, steps] SQNR) from evaluate.layer_step_sqnr.
    """
    parts = [
        "<!doctype html><html lang='en'><meta charset='utf-8'><meta name='viewport' content='width=device-width'>",
        f"<title>qexport report: {html.escape(result['model_id'])}</title><style>{STYLE}</style><main>",
        f"<h1>qexport report: {html.escape(result['model_id'])}</h1>",
        "<h2>Builds</h2>", *[_build_section(n, m) for n, m in manifests.items()],
        _how("The recipe is everything the build did (qexport build --recipe accepts the same text); the target "
             "decides storage types and the legality rules; verification ran every emitted model in onnxruntime, "
             "checked that the quantized layers run integer kernels and compared them with the simulation."),
        _headline(result),
        _steps_section(result),
    ]  # fmt: skip
    if stats is not None:
        parts.append(_ranges_section(stats))
    for name, (layers, table) in (heatmaps or {}).items():
        parts.append(_layers_section(name, layers, table))
    parts.append(_frames_section(result, samples))
    parts.append("</main></html>")
    atomic_write(Path(path), lambda p: Path(p).write_text("\n".join(parts)))
