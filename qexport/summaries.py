"""Plain-text summary tables printed by the CLI (library code logs; the CLI prints these)."""

from __future__ import annotations

from typing import Any

from qexport.metrics import standard_error
from qexport.passes.techniques import ORDER


def verification_table(v: dict[str, Any]) -> list[str]:
    """The per-model verification table and the verdict, from Verification.to_json()."""
    lines = [
        f"{'model':<16}{'steps':>8}{'int8':>6}{'emul':>6}{'float':>6}{'cos(sim)':>10}{'LSB(sim)':>10}"
        f"{'bound':>7}{'SQNR fp':>9}{'ok':>4}"
    ]
    for m in v["models"]:
        steps = f"{m['steps'][0]}-{m['steps'][-1]}" if len(m["steps"]) > 1 else str(m["steps"][0])
        lines.append(
            f"{m['model']:<16}{steps:>8}{m['integer']:>6}{m['emulated']:>6}{len(m['float']):>6}"
            f"{m['cosine_sim']:>10.6f}{m['max_lsb_sim']:>10.2f}{m['lsb_bound']:>7.1f}{m['sqnr_fp_db']:>8.1f}dB"
            f"{'yes' if m['ok'] else 'NO':>4}"
        )
        cap = v.get("cosine_floor", 0.999)
        floor = m.get("cosine_floor", cap)
        if floor < cap:
            lines.append(f"  (cosine floor {floor:.6f}, not {cap}: the simulation itself moves this far when its "
                         "input moves by 1e-6; each runtime's own rounding does the same)")  # fmt: skip
        if not m.get("lsb_judged", True):
            lines.append("  (LSB vs the simulation reported, cosine judged: every activation is requantized "
                         "to 16 bits, which the simulation does not model)")  # fmt: skip
        for layer in m["float"]:
            lines.append(f"  FAIL: quantized layer {layer} runs as float MatMul in onnxruntime")
        for matmul in m.get("attention_float", []):
            lines.append(f"  FAIL: quantized attention matmul {matmul} runs as float MatMul in onnxruntime")
        second = m.get("second")
        if second:
            lines.append(
                f"  {second['runtime']:<14}{second['integer']:>14}{second['emulated']:>6}{len(second['float']):>6}"
                f"{second['cosine_sim']:>10.6f}{second['max_lsb_sim']:>10.2f}  vs onnxruntime: cos "
                f"{second['cosine_ort']:.6f}, {second['max_lsb_ort']:.2f} LSB, SQNR {second['sqnr_ort_db']:.1f}dB"
                + (f"; vs FP {second['sqnr_fp_db']:.1f}dB" if "sqnr_fp_db" in second else "")
                + (
                    ""
                    if second.get("lsb_judged", True)
                    else " (LSB reported, cosine judged: HTP's FP16 float ops and "
                    "16-bit requantizations are not in the simulation)"
                )
            )
            if second.get("backend_ops"):
                ops = second["backend_ops"]
                lines.append(
                    f"  {'':<14}compiled graph: {sum(ops.values())} QNN ops, no CPU node (fallback off); "
                    f"compile {second['open_s']:.1f} s, run {second['run_s']:.1f} s in the simulator"
                )
            for layer in second["float"]:
                lines.append(f"  FAIL: quantized layer {layer} runs in float in {second['runtime']}")
    attention = [m for m in v["models"] if m.get("attention_integer") or m.get("attention_emulated")
                 or m.get("attention_float")]  # fmt: skip
    if attention:
        counts = [sum(m.get(k, 0) for m in attention) for k in ("attention_integer", "attention_emulated")]
        failed = sum(len(m.get("attention_float", [])) for m in attention)
        lines.append(
            f"attention matmuls (QK^T, PV) over {len(attention)} model(s): {counts[0]} int8, {counts[1]} emulated, "
            f"{failed} float"
        )
    e = v["end_to_end"]
    if e:
        figures = [
            *([f"PSNR {e['psnr_db']:.2f} dB"] if "psnr_db" in e else []),
            *([f"SSIM {e['ssim']:.4f}"] if "ssim" in e else []),
            *([f"latents SQNR {e['sqnr_latents_db']:.2f} dB"] if "sqnr_latents_db" in e else []),
            f"{e['step_ms']:.0f} ms/step in onnxruntime",
        ]
        lines.append(f"end to end vs FP (same noise): {', '.join(figures)}")
        if "psnr_db_htp" in e:
            lines.append(f"end to end on the HTP backend vs FP: PSNR {e['psnr_db_htp']:.2f} dB, "
                         f"SSIM {e['ssim_htp']:.4f}, {e['step_ms_htp']:.0f} ms/step in the simulator")  # fmt: skip
    else:
        lines.append("end to end: not run (a subset of the models was verified)")
    emulated = sum(m["emulated"] for m in v["models"])
    if emulated:
        lines.append(
            f"{emulated} layer-models: QDQ emulated in float on this runtime (it has no integer kernel for these "
            "types, or for int8 activations shared by several MatMuls; see docs/targets.md)"
        )
    lines.append("verdict: " + ("PASS" if v["ok"] else "FAIL"))
    return lines


def eval_table(result: dict[str, Any]) -> list[str]:
    """One row per build (and FP): fidelity vs FP, judge scores, size, latency."""

    def f(v: float | None, fmt: str) -> str:
        return "-" if v is None else format(v, fmt)

    lines = [f"{'build':<28}{'PSNR':>7}{'±s.e.':>6}{'SSIM':>7}{'adher.':>8}{'colour':>8}{'shape':>7}{'dir':>6}"
             f"{'temp':>6}{'tKL e-3':>8}{'SQNR/step':>10}{'MiB':>7}{'ms/step':>8}"]  # fmt: skip
    rows = [("FP (torch)", result["fp"]), *result["builds"].items()]
    for name, s in rows:
        acc = s["accuracy"]
        sq = s["step_sqnr_db"]
        lines.append(
            f"{name[-28:]:<28}{f(s['psnr_db'], '.2f'):>7}{f(s.get('psnr_se_db'), '.2f'):>6}{f(s['ssim'], '.3f'):>7}"
            f"{f(s['adherence'], '.3f'):>8}"
            f"{f(acc.get('colour'), '.3f'):>8}{f(acc.get('shape'), '.3f'):>7}{f(acc.get('direction'), '.3f'):>6}"
            f"{f(s['temporal_consistency'], '.3f'):>6}{f(_milli(s.get('temporal_kl')), '.3f'):>8}"
            f"{f(float(sum(sq) / len(sq)) if sq else None, '.1f'):>10}"
            f"{f(s['model_mib'], '.2f'):>7}{f(s['step_ms'], '.0f'):>8}"
        )
    return lines + _paired(result["builds"])


def _milli(value: float | None) -> float | None:
    return None if value is None else 1e3 * value


def _paired(builds: dict[str, Any]) -> list[str]:
    """Each build's PSNR minus the first build's, sample by sample: the mean and its standard error.

    Prompt difficulty cancels in the pairs, so this separates two builds better than their ±s.e.
    """
    samples = [(name, s.get("psnr_samples") or []) for name, s in builds.items()]
    if len(samples) < 2:
        return []
    (first, base), others = samples[0], samples[1:]
    n = len(base)
    if n < 2 or any(len(v) != n for _, v in others):
        return []
    lines = [f"PSNR against {first[-40:]}, paired over {n} samples (mean difference ± s.e.):"]
    for name, values in others:
        d = [b - a for a, b in zip(base, values, strict=True)]
        lines.append(f"  {name[-40:]:<40}{sum(d) / n:+7.2f} ± {standard_error(d):.2f} dB")
    return lines


def _alphas(manifest: dict[str, Any]) -> str:
    if manifest["quantization"]["alpha"] == "layer":
        values = sorted({a for r in manifest["ranges"] for a in r.get("group_alpha", {}).values()})
        return f"{values[0]:g}..{values[-1]:g} per layer" if values else "per layer"
    values = sorted({r["alpha"] for r in manifest["ranges"]})
    auto = " searched" if manifest["quantization"]["alpha"] == "auto" else ""
    return (", ".join(f"{v:g}" for v in values) if len(values) <= 4 else f"{values[0]:g}..{values[-1]:g}") + auto


def _lowrank(q: dict[str, Any]) -> list[str]:
    rank, cost = q.get("lowrank", 0), q.get("lowrank_cost", {})
    if not rank:
        return []
    macs, linear = cost["macs_per_call"], cost["linear_macs_per_call"]
    share = f" ({100 * macs / linear:.1f}% of the quantized linears' {linear / 1e6:.1f} M)" if linear else ""
    return [
        f"  low-rank   rank {rank} FP32 branch per linear: +{macs / 1e6:.2f} M MACs per model call{share}, "
        f"+{cost['bytes_per_model'] / 2**10:.0f} KiB per model"
    ]


def _attention(manifest: dict[str, Any]) -> list[str]:
    a = manifest["quantization"].get("attention", {})
    if not a.get("quantized"):
        return []
    lines = [f"  attention  Q, K, V and softmax output quantized in {len(a['modules'])} attentions"]
    models = manifest.get("legality", {}).get("models", [])
    if models:
        c, total = models[0]["attention"], models[0]["macs"]
        share = f" ({100 * c['quantized_macs'] / total:.1f}% of all MACs)" if total else ""
        lines[0] += f": {c['quantized']} of {c['matmuls']} attention matmuls (QK^T, PV) on quantized inputs"
        lines.append(f"             {c['quantized_macs'] / 1e6:.1f} M MACs per model call moved to integer{share}")
    return lines


def _rotation(q: dict[str, Any]) -> list[str]:
    lines = []
    if q.get("rotate"):
        groups = q["rotated_groups"]
        lines.append(f"  rotation   per-head Hadamard folded around {groups} attention outputs (value -> output)")
    online = q.get("online_rotation", {})
    if online.get("block"):
        share = 100 * online["macs_per_call"] / max(online["linear_macs_per_call"], 1)
        kind = "DuQuant rotation" if online.get("transform") == "duquant" else "Hadamard"
        lines.append(
            f"  rotation   online {kind} (block {online['block']}, {online['choice']}) on "
            f"{online['groups_rotated']} of {online['groups_considered']} inputs (first model): "
            f"+{online['macs_per_call'] / 1e6:.0f} M FP MACs per call ({share:.1f}% of the quantized linears')"
        )
    return lines


def _mixed(q: dict[str, Any]) -> list[str]:
    m = q.get("mixed_precision")
    if not m:
        return []
    low, high = m["widths"]
    rows = m["ranges"]
    raised = [r["layers_at"].get(str(high), 0) for r in rows]
    per = f"{raised[0]}" if len(set(raised)) == 1 else f"{min(raised)}..{max(raised)} (per range)"
    kib = max(r["weight_bytes"] for r in rows) / 2**10
    total = sum(rows[0]["layers_at"].values())
    return [
        f"  mixed      budget {m['budget_bits_per_weight']:g} bits/weight: {per} of {total} "
        f"layers at W{high} by measured sensitivity, the rest W{low}",
        f"  mixed      quantized weights {kib:.0f} KiB per model (all W{low} {m['all_low_bytes'] / 2**10:.0f} KiB, "
        f"all W{high} {m['all_high_bytes'] / 2**10:.0f} KiB)",
    ]


def _kv(manifest: dict[str, Any]) -> list[str]:
    kv = manifest.get("kv")
    if not kv:
        return []
    removed, left = kv["macs_removed_per_call"], kv["step_macs_per_call"]
    share = 100 * removed / (removed + left) if removed + left else 0.0
    return [
        f"  kv         {kv['model']}: K/V of {len(kv['layers'])} cross-attention linears once per prompt, "
        f"{kv['macs_per_prompt'] / 1e6:.2f} M MACs; per step model call -{removed / 1e6:.2f} M MACs "
        f"({share:.1f}% of {(removed + left) / 1e6:.1f} M)"
    ]


def build_lines(manifest: dict[str, Any], seconds: float, folder: str) -> list[str]:
    q, f = manifest["quantization"], manifest["files"]
    folds = ", ".join(f"{k} {v}" for k, v in sorted(q["folds"].items())) or "no smoothing"
    shared = f["weights_bytes"] / 2**20
    unshared = f["weights_bytes_without_sharing"] / 2**20
    return [
        f"built {len(manifest['ranges'])} model(s) in {folder} ({seconds:.1f}s): W{q['w_bits']}A{q['a_bits']}, "
        f"smooth {q['smooth']} (alpha {_alphas(manifest)}), {q['granularity']}, target {manifest['target']}",
        f"  weights    {q['weights']} (clip {q.get('weight_clip', 'minmax')}, rounding "
        f"{q.get('weight_rounding', 'nearest')}); activations {q['activations']}"
        + ("" if q.get("dynamic_activations") else f" (range {q.get('act_observer', 'minmax')})"),
        f"  layers     {q['layers']} quantized, {len(q['kept_fp'])} kept in FP",
        f"  smoothing  groups folded/explicit: {folds}",
        f"  disk       shared weights {shared:.2f} MiB (without sharing {unshared:.2f} MiB)",
        *(
            [f"  replay     {q['replay_prompts']} calibration prompt(s) replayed (FP trajectories, seed 0)"]
            if q.get("replay_prompts")
            else []
        ),
        *(line for t in ORDER for line in t.describe(q)),
        *_lowrank(q),
        *_mixed(q),
        *_rotation(q),
        *_kv(manifest),
        *_attention(manifest),
        *_tsq_note(q, len(manifest["ranges"])),
    ]


def _tsq_note(q: dict[str, Any], ranges: int) -> list[str]:
    if q["smooth"] != "tsq" or ranges < 2:
        return []
    if q.get("smooth_ranges"):
        return [
            f"  note       TSQ with smoothquant.shared_ranges {q['smooth_ranges']}: one smoothing vector s per step "
            "range, so the step models of a range share their weights W*diag(s) and each range stores its own"
        ]
    return [
        "  note       TSQ gives every range its own smoothing vector s, so its weights W*diag(s) differ "
        "per range and are stored once per range, not shared"
    ]


def legality_lines(manifest: dict[str, Any]) -> list[str]:
    """The legality report's summary: nodes per status and the share of MACs run quantized."""
    legality = manifest.get("legality")
    if not legality:
        return []
    models = legality["models"]
    first = models[0]
    t = first["totals"]
    shares = [m["quantized_mac_share"] for m in models]
    lo, hi = 100 * min(shares), 100 * max(shares)
    share = f"{lo:.1f}%" if lo == hi else f"{lo:.1f}-{hi:.1f}%"
    lines = [
        f"  legality   {manifest['target']}: 0 violations; per model {t['quantized']} quantized, {t['float']} float, "
        f"{t['unsupported']} unsupported nodes (+{t['qdq']} Q/DQ)",
        f"             {share} of MACs run quantized; per node: {legality['file']}",
    ]
    unsupported = sorted({op for m in models for op in m["unsupported"]})
    if unsupported:
        lines.append(f"  unsupported on {manifest['target']} with quantized inputs: {', '.join(unsupported)}")
    return lines


def targets_table(profiles: list[Any]) -> list[str]:
    """One line per target profile: weights, activations, scale rule."""
    width = max(len("target"), *(len(p.name) for p in profiles)) + 2
    lines = [f"{'target':<{width}}{'weights':<24}{'activations':<30}{'scales':<8}description"]
    for p in profiles:
        w = "/".join(p.weight_storage.values()) + (" sym" if p.weight_symmetric else " asym")
        w += " per-ch" if p.weight_per_channel else " per-tensor"
        a = "/".join(p.activation_storage.values()) + (" sym" if p.activation_symmetric else " asym") + " per-tensor"
        lines.append(f"{p.name:<{width}}{w:<24}{a:<30}{'pow2' if p.pow2_scales else 'float':<8}{p.description}")
    return lines


def profile_lines(profile: Any) -> list[str]:
    """Every field of one profile, with its sources."""
    data = profile.to_json()
    lines = [f"{profile.name}: {data.pop('description')}"]
    notes, source = data.pop("notes"), data.pop("source")
    for key, value in data.items():
        if isinstance(value, dict):
            value = ", ".join(f"{bits}-bit in {storage}" for bits, storage in value.items())
        elif isinstance(value, list):
            value = ", ".join(value)
        if key != "name" and value != "":
            lines.append(f"  {key:<22}{value}")
    lines += [f"  note                  {n}" for n in notes]
    lines.append(f"  source                {source}")
    return lines


def recipes_lines() -> list[str]:
    """`qexport recipes`: every preset with its description, then every technique."""
    from qexport.passes.techniques import ORDER
    from qexport.recipe import load_recipe, preset_names

    lines = ["presets (qexport build STATS --recipe NAME; files in qexport/recipes/):"]
    for name in preset_names():
        recipe = load_recipe(name)
        kinds = ", ".join(t.kind for t in recipe.techniques) or "-"
        ranges = recipe.granularity.time_ranges
        models = "per step" if ranges is None else f"{ranges} range(s)"
        lines.append(f"  {name:<20}W{recipe.bits.weights}A{recipe.bits.activations} {models:<11}{kinds}")
        lines.append(f"  {'':<20}{recipe.description}")
    lines.append("techniques (--set KIND=on, --set KIND.FIELD=VALUE; docs/recipes.md):")
    for cls in ORDER:
        lines.append(f"  {cls.kind:<20}{cls.summary}")
    return lines


def stage_lines(stages: dict[str, float], seconds: float) -> list[str]:
    """The build's time by stage (exclusive: a stage nested in another counts for itself only),
    largest first; what no stage covers is 'other'."""
    from qexport.progress import duration

    rest = seconds - sum(stages.values())
    parts = sorted(((name, s) for name, s in stages.items() if s >= 0.05), key=lambda p: -p[1])
    parts += [("other", rest)] if rest >= 0.05 else []
    return [f"  time       {' · '.join(f'{name} {duration(s)}' for name, s in parts)}"] if parts else []
