"""The top of report.html: per build its target, quantization options, verification verdict with
its key figures and recipe, then the headline numbers against FP with their standard errors.
Reads manifest.json and the evaluation's JSON as written; draws nothing."""

from __future__ import annotations

import html
from pathlib import Path
from typing import Any

import yaml

from qexport.metrics import standard_error


def num(value: Any, digits: int = 2) -> str:
    """value with `digits` decimals; "-" for None."""
    return "-" if value is None else f"{value:.{digits}f}"


def mean_se(scores: dict[str, Any], key: str, se_key: str, samples_key: str) -> tuple[Any, float | None]:
    """A score and its standard error: the recorded one, else from the per-sample list, else None."""
    se = scores.get(se_key)
    samples = scores.get(samples_key) or []
    if se is None and len(samples) > 1:
        se = standard_error(samples)
    return scores.get(key), se


def with_se(scores: dict[str, Any], key: str, se_key: str, samples_key: str, digits: int) -> str:
    """ "value ± s.e." with "-" for what the evaluation did not record."""
    value, se = mean_se(scores, key, se_key, samples_key)
    return "-" if value is None else f"{num(value, digits)} ± {num(se, digits)}"


def options_line(manifest: dict[str, Any]) -> str:
    """The quantization options in one line, from manifest["quantization"]."""
    q = manifest.get("quantization") or {}
    if not q:
        return "(not recorded)"
    parts = [f"W{q.get('w_bits')}A{q.get('a_bits')}", f"weights {q.get('weights')}",
             f"activations {q.get('activations')}", f"granularity {q.get('granularity')}"]  # fmt: skip
    if q.get("smooth") not in (None, "none"):
        parts.append(f"smoothing {q['smooth']} (alpha {q.get('alpha')})")
    parts.append(f"weight rounding {q.get('weight_rounding')}, clipping {q.get('weight_clip')}")
    techniques = [t.get("_type") for t in (manifest.get("recipe") or {}).get("techniques", [])]
    others = [str(kind) for kind in techniques if kind != "smoothquant"]
    if others:
        parts.append(f"techniques {', '.join(others)}")
    if q.get("replay_prompts"):
        parts.append(f"{q['replay_prompts']} replayed prompts")
    kept = q.get("kept_fp") or []
    parts.append(f"{q.get('layers')} quantized linears, {len(kept)} kept in FP")
    return "; ".join(html.escape(str(p)) for p in parts)


def _figures(v: dict[str, Any]) -> list[tuple[str, str]]:
    """The verification's key figures as (label, value) rows."""
    models = v.get("models") or []
    if not models:
        return []
    failed = [m.get("model", "?") for m in models if not m.get("ok", True)]
    kernels = [sum(m.get(k, 0) if k != "float" else len(m.get(k) or []) for m in models)
               for k in ("integer", "emulated", "float")]  # fmt: skip
    worst = max(models, key=lambda m: m.get("max_lsb_sim", 0) / max(m.get("lsb_bound", 1e-9), 1e-9))
    lowest = min(models, key=lambda m: m.get("cosine_sim", 0))
    rows = [
        ("models passing", f"{len(models) - len(failed)} of {len(models)}"
         + (f" (failing: {html.escape(', '.join(failed))})" if failed else "")),
        ("quantized layers on integer / emulated / float kernels", " / ".join(str(k) for k in kernels)),
        ("cosine vs simulation, lowest (that model's floor)",
         f"{lowest.get('cosine_sim', 0):.6f} ({lowest.get('cosine_floor', v.get('cosine_floor', '-'))})"),
        ("largest difference vs simulation in LSB (that model's bound)",
         f"{worst.get('max_lsb_sim', 0):.2f} ({worst.get('lsb_bound', 0):.2f})"),
        ("SQNR of a model's output vs FP, lowest", f"{min(m.get('sqnr_fp_db', 0) for m in models):.1f} dB"),
    ]  # fmt: skip
    e2e = v.get("end_to_end") or {}
    if "psnr_db" in e2e:
        rows.append(("end to end vs FP, same noise (one prompt)",
                     f"PSNR {e2e['psnr_db']:.2f} dB, SSIM {num(e2e.get('ssim'), 3)}"))  # fmt: skip
    return rows


def verdict(manifest: dict[str, Any]) -> str:
    """The verification verdict (PASS / FAIL / NOT VERIFIED) and its key figures as a table."""
    v = manifest.get("verification") or {}
    if not v:
        return "<p>Verification: <span class='verdict fail'>NOT VERIFIED</span> run qexport verify on this build</p>"
    ok = bool(v.get("ok"))
    runtime = html.escape(str(v.get("runtime", "onnxruntime")))
    rows = "".join(f"<tr><td>{k}</td><td>{val}</td></tr>" for k, val in _figures(v))
    return (f"<p>Verification: <span class='verdict {'pass' if ok else 'fail'}'>{'PASS' if ok else 'FAIL'}</span> "
            f"{len(v.get('models') or [])} model(s) verified on {runtime}</p>"
            + (f"<div class='scroll'><table class='kv'>{rows}</table></div>" if rows else ""))  # fmt: skip


def build_card(name: str, manifest: dict[str, Any]) -> str:
    """One build: its target, options, verdict and (folded) recipe."""
    recipe = manifest.get("recipe")
    text = yaml.safe_dump(recipe, sort_keys=False) if recipe else "(built by an older qexport: no recipe recorded)"
    return (
        f"<h3>Build {html.escape(Path(name).name)}</h3>"
        f"<p><b>Target</b> {html.escape(str(manifest.get('target')))}, {len(manifest.get('ranges', []))} model(s) "
        f"over {len(manifest.get('steps', []))} steps. <b>Options</b> {options_line(manifest)}.</p>"
        f"{verdict(manifest)}<details><summary>recipe (qexport build --recipe reads it)</summary>"
        f"<pre>{html.escape(text)}</pre></details>"
    )


def headline(result: dict[str, Any]) -> str:
    """The headline table: FP and every build, PSNR / SSIM / adherence ± s.e., speed and size."""
    head = ("<tr><th>model</th><th>PSNR vs FP, dB</th><th>SSIM vs FP</th><th>adherence</th>"
            "<th>temporal consistency</th><th>ms / step</th><th>MiB on disk</th></tr>")  # fmt: skip
    rows = [head]
    for name, s in [("FP (reference)", result["fp"]), *result["builds"].items()]:
        cells = [with_se(s, "psnr_db", "psnr_se_db", "psnr_samples", 2),
                 with_se(s, "ssim", "ssim_se", "ssim_samples", 3),
                 with_se(s, "adherence", "adherence_se", "adherence_samples", 3),
                 num(s.get("temporal_consistency"), 3), num(s.get("step_ms"), 0), num(s.get("model_mib"))]  # fmt: skip
        label = html.escape(name if name.startswith("FP") else Path(name).name)
        rows.append(f"<tr><td>{label}</td>" + "".join(f"<td>{c}</td>" for c in cells) + "</tr>")
    return "<div class='scroll'><table class='headline'>" + "".join(rows) + "</table></div>"


def how_headline(result: dict[str, Any]) -> str:
    """The "how to read this" text under the headline table."""
    samples = len(result["prompts"]) * len(result["seeds"])
    return (f"Each build and the FP model sample the same {samples} prompt × seed pair(s) from the same noise. PSNR "
            "and SSIM compare the final frames with FP's (higher is closer; SSIM 1 is identical). ± is the standard "
            "error of the mean over the samples, \"-\" where the evaluation did not record one: two builds whose "
            "difference is within about two standard errors are not told apart. Adherence is the judge's accuracy "
            "on the colour, shape and motion the prompt names; compare it with FP's own row. ms / step was "
            "measured on whatever else the machine was doing and is not a speed benchmark.")  # fmt: skip
