"""Plain-text summary tables printed by the CLI (library code logs; the CLI prints these)."""

from __future__ import annotations

from typing import Any


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
        for layer in m["float"]:
            lines.append(f"  FAIL: quantized layer {layer} runs as float MatMul in onnxruntime")
        second = m.get("second")
        if second:
            lines.append(
                f"  {second['runtime']:<14}{second['integer']:>14}{second['emulated']:>6}{len(second['float']):>6}"
                f"{second['cosine_sim']:>10.6f}{second['max_lsb_sim']:>10.2f}  vs onnxruntime: cos "
                f"{second['cosine_ort']:.6f}, {second['max_lsb_ort']:.2f} LSB, SQNR {second['sqnr_ort_db']:.1f}dB"
            )
            for layer in second["float"]:
                lines.append(f"  FAIL: quantized layer {layer} runs in float in {second['runtime']}")
    e = v["end_to_end"]
    if e:
        lines.append(
            f"end to end vs FP (same noise): PSNR {e['psnr_db']:.2f} dB, SSIM {e['ssim']:.4f}, "
            f"{e['step_ms']:.0f} ms/step in onnxruntime"
        )
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

    lines = [f"{'build':<28}{'PSNR':>7}{'SSIM':>7}{'adher.':>8}{'colour':>8}{'shape':>7}{'dir':>6}{'temp':>6}"
             f"{'SQNR/step':>10}{'MiB':>7}{'ms/step':>8}"]  # fmt: skip
    rows = [("FP (torch)", result["fp"]), *result["builds"].items()]
    for name, s in rows:
        acc = s["accuracy"]
        sq = s["step_sqnr_db"]
        lines.append(
            f"{name[-28:]:<28}{f(s['psnr_db'], '.2f'):>7}{f(s['ssim'], '.3f'):>7}{f(s['adherence'], '.3f'):>8}"
            f"{f(acc.get('colour'), '.3f'):>8}{f(acc.get('shape'), '.3f'):>7}{f(acc.get('direction'), '.3f'):>6}"
            f"{f(s['temporal_consistency'], '.3f'):>6}{f(float(sum(sq) / len(sq)) if sq else None, '.1f'):>10}"
            f"{f(s['model_mib'], '.2f'):>7}{f(s['step_ms'], '.0f'):>8}"
        )
    return lines


def _alphas(manifest: dict[str, Any]) -> str:
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


def _rotation(q: dict[str, Any]) -> list[str]:
    if not q.get("rotate"):
        return []
    return [f"  rotation   per-head Hadamard folded around {q['rotated_groups']} attention outputs (value -> output)"]


def build_lines(manifest: dict[str, Any], seconds: float, folder: str) -> list[str]:
    q, f = manifest["quantization"], manifest["files"]
    folds = ", ".join(f"{k} {v}" for k, v in sorted(q["folds"].items())) or "no smoothing"
    shared = f["weights_bytes"] / 2**20
    unshared = f["weights_bytes_without_sharing"] / 2**20
    return [
        f"built {len(manifest['ranges'])} model(s) in {folder} ({seconds:.1f}s): W{q['w_bits']}A{q['a_bits']}, "
        f"smooth {q['smooth']} (alpha {_alphas(manifest)}), {q['granularity']}, target {manifest['target']}",
        f"  weights    {q['weights']} (clip {q.get('weight_clip', 'minmax')}, rounding "
        f"{q.get('weight_rounding', 'nearest')}); activations {q['activations']} "
        f"(range {q.get('act_observer', 'minmax')})",
        f"  layers     {q['layers']} quantized, {len(q['kept_fp'])} kept in FP",
        f"  smoothing  groups folded/explicit: {folds}",
        f"  disk       shared weights {shared:.2f} MiB (without sharing {unshared:.2f} MiB)",
        *_lowrank(q),
        *_rotation(q),
    ] + (
        [
            "  note       TSQ gives every range its own smoothing vector s, so its weights W*diag(s) differ "
            "per range and are stored once per range, not shared"
        ]
        if q["smooth"] == "tsq" and len(manifest["ranges"]) > 1
        else []
    )


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
    lines = [f"{'target':<14}{'weights':<24}{'activations':<30}{'scales':<8}description"]
    for p in profiles:
        w = "/".join(p.weight_storage.values()) + (" sym" if p.weight_symmetric else " asym")
        w += " per-ch" if p.weight_per_channel else " per-tensor"
        a = "/".join(p.activation_storage.values()) + (" sym" if p.activation_symmetric else " asym") + " per-tensor"
        lines.append(f"{p.name:<14}{w:<24}{a:<30}{'pow2' if p.pow2_scales else 'float':<8}{p.description}")
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
