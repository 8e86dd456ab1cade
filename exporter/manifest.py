"""Write manifest.json for a build: inputs, steps with their model files and sampler
coefficients, CFG, the quantization config, the target, the tool version, verification; sealed
(write_manifest): every file's size and sha256, and a digest of the manifest's own content."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from qexport.calib.store import QStats
from qexport.exporter.built import BuildConfig, BuiltRange
from qexport.exporter.emit import WEIGHTS_FILE, EmitSummary
from qexport.exporter.mixed import mixed_manifest, raised
from qexport.passes.attention import OPERANDS
from qexport.passes.plan import QuantConfig, Smooth
from qexport.passes.techniques import ORDER
from qexport.targets.profile import TargetProfile

from qexport import __version__
from qexport.errors import QexportError
from qexport.media import atomic_write
from qexport.models.adapter import ModelAdapter
from qexport.models.scheduler import check, probe
from qexport.runtime.manifest import DIGEST, MANIFEST, SCHEMA_VERSION, check_content, file_digest, manifest_digest
from qexport.runtime.schema_types import MAX_FILES, path_problem
from qexport.schema import plain_json


def make_manifest(
    adapter: ModelAdapter,
    stats: QStats,
    config: BuildConfig,
    target: TargetProfile,
    ranges: list[BuiltRange],
    emit: EmitSummary,
) -> dict[str, Any]:
    null = adapter.conditioner.null(2)
    inputs = [
        {"name": "latents", "shape": [2, *adapter.latent_shape], "dtype": "float32"},
        {"name": "cond", "shape": list(null.shape), "dtype": str(null.numpy().dtype)},
    ]
    if config.ranges is not None:
        inputs.append({"name": "timestep", "shape": [2], "dtype": "int64"})
    range_of = {s: r.index for r in ranges for s in r.steps}
    scheduler = probe(adapter.make_scheduler(), stats.steps)
    check(adapter.make_scheduler(), scheduler)
    q = config.quant
    return {
        **identity_record(adapter),
        "prediction_type": adapter.scheduler_config.get("prediction_type", "epsilon"),
        "latent_shape": list(adapter.latent_shape),
        "pixel_latents": adapter.pixel_latents,
        "inputs": inputs,
        "output": {"name": "output", "shape": [2, *adapter.latent_shape], "dtype": "float32"},
        "cfg": stats.header["cfg"],
        "steps": [
            {
                "index": i,
                "timestep": int(row["timestep"]),
                "range": range_of[i],
                "model": ranges[range_of[i]].model_file,
            }
            for i, row in enumerate(scheduler["steps"])
        ],
        "scheduler": scheduler,
        "ranges": ranges_record(ranges, q),
        "quantization": quantization_record(config, target, stats, ranges),
        **target_record(target),
        "calibration": {k: stats.header[k] for k in ("prompts_hash", "prompts", "seeds", "samples", "config_hash")},
        "files": files_record(emit),
        "verification": None,
    }


def identity_record(adapter: ModelAdapter) -> dict[str, Any]:
    """The manifest's first entries: its schema, the tool, and the model it was built from."""
    return {
        "schema_version": SCHEMA_VERSION,
        "tool_version": __version__,
        "model_id": adapter.model_id,
        "class_name": adapter.class_name,
        "config_hash": adapter.config_hash(),
    }


def target_record(target: TargetProfile) -> dict[str, Any]:
    """The manifest's target, and for an NPU whose float ops need a given SoC (QNN HTP's FP16
    islands) the SoC the build assumes, as its runtime options (soc_model, htp_arch)."""
    device = {"target_device": {**target.fp16_soc, "float_ops": "fp16"}} if target.fp16_soc else {}
    return {"target": target.name, **device}


def files_record(emit: EmitSummary) -> dict[str, Any]:
    """The manifest's files: the shared weights file, its size with and without sharing."""
    return {"weights": WEIGHTS_FILE, "weights_bytes": emit.weights_bytes,
            "weights_bytes_without_sharing": emit.logical_bytes}  # fmt: skip


def ranges_record(ranges: list[BuiltRange], q: QuantConfig) -> list[dict[str, Any]]:
    """The manifest's ranges: each range's steps, model file and resolved choices."""
    return [
        {
            "index": r.index,
            "steps": r.steps,
            "model": r.model_file,
            "alpha": r.plan.alpha,
            "act_shrink": r.plan.act_shrink,
            **({"group_alpha": r.plan.group_alpha} if r.plan.group_alpha else {}),
            **({"online_rotated": sorted(r.plan.online)} if r.plan.online else {}),
            **({"online_check": r.plan.online_report} if r.plan.online_report else {}),
            **({"w_bits_raised": raised(r.plan, q.w_bits)} if q.mixed_precision else {}),
            "search_sqnr_db": {k: {str(c): round(v, 3) for c, v in s.items()} for k, s in r.plan.scores.items()},
            **_attention_ranges(r),
        }
        for r in ranges
    ]


def _activations(q: QuantConfig, target: TargetProfile) -> str:
    """How the quantized linears' inputs are stored and where their scales come from."""
    dynamic = q.techniques.get("dynamic_activations")
    if dynamic is not None:  # passes.techniques.dynamic: DynamicQuantizeLinear's rule, uint8 codes
        return f"uint8 per {dynamic.granularity}, asymmetric, dynamic (computed at run time)"
    pow2 = ", power-of-two scales" if target.pow2_scales else ""
    return (f"{target.activation_type(q.a_bits)} per tensor, "
            f"{'symmetric' if target.activation_symmetric else 'asymmetric'}, static{pow2}")  # fmt: skip


def quantization_record(
    config: BuildConfig, target: TargetProfile, stats: QStats, ranges: list[BuiltRange]
) -> dict[str, Any]:
    """The manifest's quantization record: storage types, the recipe's resolved settings and each
    technique's own entries."""
    q = config.quant
    pow2 = ", power-of-two scales" if target.pow2_scales else ""
    w_axis = "per output channel" if target.weight_per_channel else "per tensor"
    if q.w_group:
        w_axis = f"per output channel and group of {q.w_group} input channels"
    weights = (
        f"{target.weight_type(q.w_bits)} {w_axis}, {'symmetric' if target.weight_symmetric else 'asymmetric'}{pow2}"
    )
    if "codebook_weights" in q.techniques:  # not a uniform grid: what the file holds instead
        weights = "uint8 indices into a k-means codebook per layer, decoded to float at load"
    elif "twin_log_weights" in q.techniques:
        codes = "uint4" if q.w_bits <= 4 else "uint8"
        weights = f"{codes} codes into {2**q.w_bits} levels per output channel, decoded to float at load"
    return {
        "w_bits": q.w_bits,
        "a_bits": q.a_bits,
        "weights": weights,
        "activations": _activations(q, target),
        "smooth": q.smooth.value,
        **({"asq_stat": q.asq_stat} if q.smooth == Smooth.ASQ else {}),
        "weight_clip": q.weight_clip,
        **({"smooth_ranges": q.smooth_ranges} if q.smooth_ranges else {}),
        "weight_rounding": q.weight_rounding.value,
        "act_observer": str(q.act_observer),
        "alpha": "auto" if q.alpha_auto else "layer" if q.alpha_layer else q.alpha,
        "granularity": "timestep-wise" if config.ranges is None else f"{config.ranges} time ranges",
        "layers": len(stats.layers),
        "kept_fp": stats.header.get("excluded", []),
        "folds": {k: v for r in ranges[:1] for k, v in r.plan.folds.items()},
        "lowrank": q.lowrank,
        "rotate": q.rotate,
        "rotated_groups": len(ranges[0].plan.rotations),
        "online_rotation": {
            "block": q.online_rotation,
            "choice": q.rotation_choice,
            **({"transform": q.rotation_transform} if q.rotation_transform != "hadamard" else {}),
            "groups_rotated": len(ranges[0].plan.online),
            "groups_considered": len(ranges[0].plan.online_report),
            "macs_per_call": ranges[0].rotation_macs,
            "linear_macs_per_call": ranges[0].lowrank.linear_macs,
        },
        "attention": _attention(ranges),
        **(
            {
                "mixed_precision": mixed_manifest(
                    [(r.index, r.plan, r.mixed) for r in ranges], q.w_bits, q.mixed_precision, target
                )
            }
            if q.mixed_precision
            else {}
        ),
        "lowrank_cost": {
            "macs_per_call": ranges[0].lowrank.macs,
            "linear_macs_per_call": ranges[0].lowrank.linear_macs,
            "bytes_per_model": ranges[0].lowrank.bytes,
        },
        **{k: v for t in ORDER for k, v in t.record(q, [r.plan for r in ranges]).items()},
    }


def _attention(ranges: list[BuiltRange]) -> dict[str, Any]:
    """What --quantize-attention quantized (the same modules in every range)."""
    modules = sorted(ranges[0].plan.attention)
    if not modules:
        return {"quantized": False}
    return {
        "quantized": True,
        "modules": modules,
        "matmuls": 2 * len(modules),
        "operands": {
            "query": "q*sqrt(1/sqrt(d)) as QK^T reads it",
            "key": "k^T*sqrt(1/sqrt(d)) as QK^T reads it",
            "probs": "softmax output, fixed range [0, 1]",
            "value": "v as PV reads it (after the value projection's folds)",
        },
        "ranges_from": "per range, min/max on the replayed calibration prompts (seed 0), the range's linears simulated",
    }


def _attention_ranges(r: BuiltRange) -> dict[str, Any]:
    """Per range: each attention operand's (min, max) behind its scale (absent without --quantize-attention)."""
    if not r.plan.attention:
        return {}
    return {
        "attention_ranges": {
            name: {op: [float(f"{ap.operand(op).lo:.6g}"), float(f"{ap.operand(op).hi:.6g}")] for op in OPERANDS}
            for name, ap in r.plan.attention.items()
        }
    }


def write_manifest(folder: Path, manifest: dict[str, Any]) -> None:
    """Seal and write folder/manifest.json (atomically): record every file of the folder (size,
    sha256, streamed: a read of the whole build), check the content as every reader will
    (runtime.manifest.check_content), and add the digest of the rest. `manifest` gets the same
    `integrity` and `digest` entries. Every writer of a manifest (build, verify, contexts) calls this.

    Raises:
        QexportError: a manifest its readers would refuse (a bug in the code that made it).
    """
    folder = Path(folder)
    manifest.pop(DIGEST, None)
    manifest["integrity"] = integrity_record(folder)
    data = plain_json(manifest)
    data[DIGEST] = manifest[DIGEST] = manifest_digest(data)
    check_content(data, f"the {MANIFEST} being written to {folder}")
    atomic_write(folder / MANIFEST, lambda p: Path(p).write_text(json.dumps(data, indent=2, allow_nan=False)))


def integrity_record(folder: Path) -> dict[str, Any]:
    """Size and sha256 of every file under folder (subfolders too) but manifest.json, by relative
    name; hidden files (temporaries, locks) and names a manifest cannot hold are left out.

    Raises:
        QexportError: a folder with more files than a manifest records.
    """
    root = Path(folder).resolve()
    files: dict[str, Any] = {}
    for path in sorted(root.rglob("*")):
        name = path.relative_to(root).as_posix()
        if name == MANIFEST or path_problem(name) is not None or not path.is_file():
            continue
        if not path.resolve().is_relative_to(root):
            continue  # a symlink out of the folder is no file of the build
        if len(files) == MAX_FILES:
            raise QexportError(f"{folder} holds more than {MAX_FILES} files; a build folder holds its models")
        files[name] = {"bytes": path.stat().st_size, "sha256": file_digest(path)}
    return {"algorithm": "sha256", "files": files}
