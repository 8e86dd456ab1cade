"""``demo``: the whole path on the built-in tiny-latte: calibrate -> build (W8A8 TSQ + TSW) ->
verify -> eval -> report.html, sized to finish in a few minutes on 2 CPU cores."""

from __future__ import annotations

import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qexport.calib.run import CalibConfig, calibrate
from qexport.calib.store import save
from qexport.errors import QexportError
from qexport.exporter.build import BuildConfig, build
from qexport.exporter.manifest import write_manifest
from qexport.models import shapes
from qexport.models.registry import load_model
from qexport.progress import Progress, Units
from qexport.recipe import load_recipe
from qexport.targets.catalog import get_profile
from qexport.verification.evaluate import evaluate, layer_step_sqnr, write_json
from qexport.verification.report import write_report
from qexport.verification.verify import verify

RECIPE = "w8a8-tsq-tsw"  # W8A8 TSQ + TSW
CALIB_PROMPTS = 4
EVAL_PROMPTS = 3


@dataclass(kw_only=True)
class DemoResult:
    folder: Path
    build_dir: Path
    report: Path
    manifest: dict[str, Any]
    verification: dict[str, Any]
    evaluation: dict[str, Any]
    seconds: dict[str, float]


def demo(folder: Path, force: bool = False, threads: int | None = None, progress: Progress | None = None) -> DemoResult:
    """Run the demo into folder (stats, out/, eval.json, report.html).

    Args:
        threads: onnxruntime intra-op threads for verification and evaluation (None: its default).
        progress: ticks of the "demo" task (one per phase) and of each phase's own task.
    """
    phases = Units(progress, "demo (phases)", 4)
    if folder.exists():
        if not force:
            raise QexportError(f"demo folder {folder} exists; pass --force to replace it")
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    seconds: dict[str, float] = {}
    pool = shapes.eval_prompts()
    calib = tuple(pool[1 :: len(pool) // CALIB_PROMPTS][:CALIB_PROMPTS])
    evals = pool[:: len(pool) // EVAL_PROMPTS][:EVAL_PROMPTS]

    t = time.perf_counter()
    phases.start(f"calibrating tiny-latte on {len(calib)} prompts, 20 steps, CFG 7")
    adapter = load_model("tiny-latte")
    stats = calibrate(adapter, CalibConfig(prompts=calib, batch_size=len(calib)), progress).stats
    stats_path = folder / "run.qstats"
    save(stats, stats_path)
    seconds["calibrate"] = time.perf_counter() - t
    phases.done("calibrated; building W8A8 TSQ + TSW: one int8 QDQ model per step")

    t = time.perf_counter()
    out = folder / "out"
    built = build(stats_path, out, BuildConfig(recipe=load_recipe(RECIPE)), progress=progress)
    seconds["build"] = time.perf_counter() - t
    phases.done("built; verifying on onnxruntime (integer kernels, simulation, FP)")

    t = time.perf_counter()
    plans = [r.plan for r in built.ranges]
    v = verify(
        out, built.adapter, plans, built.manifest, get_profile("ort-cpu"), evals[0], threads=threads, progress=progress
    )
    built.manifest["verification"] = {"prompt": evals[0], **v.to_json()}
    write_manifest(out, built.manifest)
    seconds["verify"] = time.perf_counter() - t
    phases.done(f"verified; evaluating vs FP on {len(evals)} prompts")

    t = time.perf_counter()
    result = evaluate([out], evals, [0], progress=progress, threads=threads)
    write_json(result, folder / "eval.json")
    heat = {str(out): layer_step_sqnr(built.adapter, plans, built.manifest, evals[0], 0)}
    report = folder / "report.html"
    write_report(report, result.to_json(), result.first_samples, {str(out): built.manifest}, stats, heat)
    seconds["eval"] = time.perf_counter() - t
    phases.done("evaluated; report written")
    return DemoResult(
        folder=folder,
        build_dir=out,
        report=report,
        manifest=built.manifest,
        verification=built.manifest["verification"],
        evaluation=result.to_json(),
        seconds=seconds,
    )
