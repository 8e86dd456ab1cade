"""The ``qexport`` command line: each command parses, calls one library function, prints a summary."""

from __future__ import annotations

import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

import click

from qexport import __version__
from qexport.build_flags import alias_assignments, alias_options
from qexport.cli_args import (
    check_device,
    check_threads,
    conditioning_text,
    existing_file,
    model_options,
    pipeline_call,
    set_threads,
)
from qexport.errors import QexportError
from qexport.progress import ProgressPrinter, Units, duration

log = logging.getLogger("qexport")


def _ints(text: str, option: str) -> list[int]:
    try:
        return [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise QexportError(f"{option} must be comma-separated integers, got {text!r}") from None


def _seeds(text: str) -> list[int]:
    return _ints(text, "--seeds")


@click.group()
@click.version_option(__version__, prog_name="qexport")
@click.option("--debug", is_flag=True, help="Show tracebacks and debug logs.")
@click.pass_context
def cli(ctx: click.Context, debug: bool) -> None:
    """Static-quantization export of diffusion transformers to ONNX for NPUs."""
    logging.basicConfig(level=logging.DEBUG if debug else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")  # read when diffusers is imported; importing it here
    # would load torch before a command could print its first line
    ctx.obj = {"debug": debug}


@cli.command()
def models() -> None:
    """List the built-in models and the named full-size configs."""
    from qexport.models.registry import list_models

    click.echo(f"{'name':<18}{'class':<26}{'params':>10}{'size':>10}  description")
    for m in list_models():
        params = f"{m.parameters / 1e6:.2f}M" if m.parameters else "-"
        size = f"{m.size_bytes / 2**20:.1f}MiB" if m.size_bytes else "-"
        tag = " [random-init]" if m.random_init else ""
        click.echo(f"{m.name:<18}{m.class_name:<26}{params:>10}{size:>10}  {m.description}{tag}")


@cli.command()
@click.option("--model", "model_name", required=True, help="tiny-latte, tiny-dit, a full-size name or diffusers:/path.")
@click.option("--prompt", help='Caption for text-conditioned models, e.g. "a blue square moving up".')
@click.option("--label", help='Class label for class-conditioned models, e.g. "red circle".')
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--steps", type=int, default=20, show_default=True)
@click.option("--cfg", type=float, default=7.0, show_default=True)
@click.option("-o", "--output", type=click.Path(path_type=Path), required=True, help="clip.gif (video) or image.png.")
def sample(
    model_name: str, prompt: str | None, label: str | None, seed: int, steps: int, cfg: float, output: Path
) -> None:
    """Sample one clip or image with the FP model; writes a GIF and a PNG strip of frames."""
    from qexport.media import output_paths, save_gif, save_png, strip
    from qexport.models.registry import load_model
    from qexport.models.sampler import SamplingConfig
    from qexport.models.sampler import sample as run_sampler
    from qexport.progress import report

    config = SamplingConfig(steps=steps, cfg=cfg)
    adapter = load_model(model_name)
    text = conditioning_text(adapter.conditioner.kind, prompt, label)
    paths = output_paths(output, adapter.is_video)
    cond = adapter.conditioner.encode([text])
    start = time.perf_counter()
    printer = ProgressPrinter()
    task = f"sampling {adapter.model_id} (steps)"
    latents = run_sampler(adapter, cond, [seed], config, on_step=lambda i, t: report(printer, task, i, steps))
    report(printer, task, steps, steps)
    printer.close()
    pixels = adapter.decode(latents)[0]
    elapsed = time.perf_counter() - start
    if adapter.is_video:
        save_gif(paths[0], pixels)
        save_png(paths[1], strip(pixels))
        click.echo(f"wrote {paths[0]} and {paths[1]} ({len(pixels)} frames, {steps} steps, {elapsed:.1f}s)")
    else:
        save_png(paths[0], pixels)
        click.echo(f"wrote {paths[0]} ({steps} steps, {elapsed:.1f}s)")


@cli.command()
@click.option("--model", "model_name", default="tiny-latte", show_default=True)
@click.option("--seeds", default="0", show_default=True, help="Comma-separated noise seeds.")
@click.option("--steps", type=int, default=20, show_default=True)
@click.option("--cfg", type=float, default=7.0, show_default=True)
@click.option("--full", is_flag=True, help="Every colour x shape x direction instead of the 24-prompt set.")
@click.option("--batch-size", type=int, default=8, show_default=True)
def judge(model_name: str, seeds: str, steps: int, cfg: float, full: bool, batch_size: int) -> None:
    """Judge the FP model's samples on the evaluation set (colour, shape, direction)."""
    from qexport.models.fp_eval import default_prompts, evaluate_fp
    from qexport.models.registry import load_model
    from qexport.models.sampler import SamplingConfig

    config = SamplingConfig(steps=steps, cfg=cfg)
    adapter = load_model(model_name)
    prompts = default_prompts(adapter, full=full)
    seed_list = _seeds(seeds)
    start = time.perf_counter()
    printer = ProgressPrinter()
    units = Units(printer, "sampling (samples)", len(prompts) * len(seed_list))
    result = evaluate_fp(adapter, prompts, seed_list, config, batch_size=batch_size, progress=lambda n: units.done(n=n))
    printer.close()
    r = result.report
    click.echo(f"{adapter.model_id}: {r.count} samples, {steps} steps, CFG {cfg}, {time.perf_counter() - start:.0f}s")
    for key, value in r.accuracy.items():
        click.echo(f"  {key:<22}{value:.3f}")
    click.echo(f"  {'adherence':<22}{r.adherence:.3f}")
    if r.temporal_consistency is not None:
        click.echo(f"  {'temporal consistency':<22}{r.temporal_consistency:.3f}")


def _shard(text: str | None) -> tuple[int, int] | None:
    if text is None:
        return None
    try:
        i, n = (int(v) for v in text.split("/"))
    except ValueError:
        raise QexportError(f"--shard must look like i/n (e.g. 0/2), got {text!r}") from None
    return i, n


def _prompts(prompts_file: Path | None, labels: str | None) -> list[str]:
    if prompts_file is not None:
        if not prompts_file.is_file():
            raise QexportError(f"prompts file {prompts_file} does not exist")
        lines = [line.strip() for line in prompts_file.read_text().splitlines()]
        return [line for line in lines if line and not line.startswith("#")]
    if labels is not None:
        return [label.strip() for label in labels.split(",") if label.strip()]
    raise QexportError("give --prompts FILE (one caption per line) or --labels 'red circle,blue square'")


@cli.command()
@click.option("--model", "model_name", required=True)
@click.option("--prompts", "prompts_file", type=click.Path(path_type=Path), help="Captions, one per line.")
@click.option("--labels", help="Comma-separated class labels (class-conditional models).")
@click.option("--steps", type=int, default=20, show_default=True)
@click.option("--cfg", type=float, default=7.0, show_default=True)
@click.option("--seeds", default="0", show_default=True)
@click.option("--batch-size", type=int, default=4, show_default=True, help="Prompts per sampling batch (x2 for CFG).")
@click.option("--include", multiple=True, help="Layer name pattern to hook (fnmatch); repeatable.")
@click.option("--exclude", multiple=True, help="Layer name pattern to leave in FP (fnmatch); repeatable.")
@click.option("--histograms", is_flag=True, help="Also collect histograms (percentile / MSE observers).")
@click.option("--shard", help="Calibrate only shard i of n (i/n); merge shards with qexport merge.")
@click.option("--device", default="cpu", show_default=True)
@click.option(
    "--dtype",
    type=click.Choice(["auto", "fp32", "fp16", "bf16"]),
    default="auto",
    show_default=True,
    help="Autocast of the sampling loop; auto = fp16 on CUDA, fp32 on CPU (statistics are kept in fp32/fp64).",
)
@click.option("--call", "calls", multiple=True, metavar="KEY=VALUE",
              help="pipeline:FOLDER only: another argument of the pipeline's __call__ (height=512, "
              "guidance_scale=4.5, ...).")  # fmt: skip
@click.option("-o", "--output", type=click.Path(path_type=Path), required=True)
def calibrate(
    model_name: str,
    prompts_file: Path | None,
    labels: str | None,
    steps: int,
    cfg: float,
    seeds: str,
    batch_size: int,
    include: tuple[str, ...],
    exclude: tuple[str, ...],
    histograms: bool,
    shard: str | None,
    device: str,
    dtype: str,
    calls: tuple[str, ...],
    output: Path,
) -> None:
    """Collect per-layer, per-step activation statistics from the FP sampling loop (for
    ``--model pipeline:FOLDER``, the pipeline's own)."""
    if model_name.startswith("pipeline:"):
        ctx = click.get_current_context()
        given = [f"--{n.replace('_', '-')}" for n in ("cfg", "batch_size", "shard", "dtype")
                 if ctx.get_parameter_source(n) != click.core.ParameterSource.DEFAULT]  # fmt: skip
        if given:
            raise QexportError(f"{given[0]} does not apply to a pipeline's own loop; set its arguments with --call")
        folder = Path(model_name.removeprefix("pipeline:"))
        _calibrate_pipeline(folder, _prompts(prompts_file, labels), steps, _seeds(seeds), pipeline_call(calls),
                            include, exclude, histograms, device, output)  # fmt: skip
        return
    if calls:
        raise QexportError("--call applies to --model pipeline:FOLDER only")
    from qexport.calib.run import CalibConfig
    from qexport.calib.run import calibrate as run_calibration
    from qexport.calib.selection import DEFAULT_INCLUDE, LayerSelection
    from qexport.calib.store import save
    from qexport.models.registry import load_model
    from qexport.models.sampler import SamplingConfig

    config = CalibConfig(
        prompts=tuple(_prompts(prompts_file, labels)),
        seeds=tuple(_seeds(seeds)),
        sampling=SamplingConfig(steps=steps, cfg=cfg),
        batch_size=batch_size,
        selection=LayerSelection(include=include or DEFAULT_INCLUDE, exclude=exclude),
        histograms=histograms,
        shard=_shard(shard),
        device=device,
        dtype=dtype,
    )
    adapter = load_model(model_name)
    printer = ProgressPrinter()
    result = run_calibration(adapter, config, progress=printer)
    printer.close()
    if result.rank != 0:
        return
    size = save(result.stats, output)
    h = result.stats.header
    click.echo(f"wrote {output} ({size / 1024:.0f} KiB) in {result.seconds:.1f}s")
    click.echo(f"  model      {h['model_id']} (config {h['config_hash']})")
    click.echo(
        f"  layers     {result.hooked} hooked, {len(result.excluded)} kept in FP: {', '.join(result.excluded[:6])}"
        + (" ..." if len(result.excluded) > 6 else "")
    )
    click.echo(
        f"  sampling   {steps} steps, CFG {cfg}, {h['samples']} samples ({len(config.prompts)} prompts x "
        f"{len(config.seeds)} seeds), shard {h['shard'] or 'all'}, autocast {h['autocast']}"
    )


def _calibrate_pipeline(
    folder: Path, prompts: list[str], steps: int, seeds: list[int], call: dict[str, Any], include: tuple[str, ...],
    exclude: tuple[str, ...], histograms: bool, device: str, output: Path,
) -> None:  # fmt: skip
    """`calibrate` through a diffusers pipeline folder's own __call__ (calib.pipeline)."""
    from qexport.calib.pipeline import PipelineCalibConfig, calibrate_pipeline
    from qexport.calib.store import save

    config = PipelineCalibConfig(prompts=tuple(prompts), seeds=tuple(seeds), steps=steps, call=call,
                                 include=include, exclude=exclude, histograms=histograms, device=device)  # fmt: skip
    printer = ProgressPrinter()
    result = calibrate_pipeline(folder, config, progress=printer)
    printer.close()
    size = save(result.stats, output)
    h = result.stats.header
    click.echo(f"wrote {output} ({size / 1024:.0f} KiB) in {result.seconds:.1f}s")
    click.echo(f"  pipeline   {h['pipeline']} from {folder}, transformer {h['class_name']} (config {h['config_hash']})")
    click.echo(f"  layers     {result.hooked} hooked, {len(result.excluded)} kept in FP")
    click.echo(f"  sampling   {steps} steps of {h['scheduler']['class']}, {h['samples']} runs "
               f"({len(prompts)} prompts x {len(seeds)} seeds), arguments {call or 'the defaults'}")  # fmt: skip


@cli.command()
@click.argument("stats_file", type=click.Path(path_type=Path))
@click.option("--top", type=int, default=10, show_default=True, help="Widest layers to list.")
@click.option("--plot", "plot_layer", help="Plot this layer's range across steps ...")
@click.option("-o", "--output", type=click.Path(path_type=Path), help="... to this PNG.")
def inspect(stats_file: Path, top: int, plot_layer: str | None, output: Path | None) -> None:
    """Summarise a .qstats file; optionally plot one layer's range across steps."""
    from qexport.calib.inspect import layer_ranges
    from qexport.calib.inspect import plot_layer as plot
    from qexport.calib.store import load

    stats = load(stats_file)
    h = stats.header
    rows = layer_ranges(stats)
    click.echo(
        f"{stats_file}: {h['model_id']} (config {h['config_hash']}), {len(rows)} layers x {h['steps']} steps, "
        f"{h['samples']} samples, CFG {h['cfg']}, qstats v{h['version']} by qexport {h['tool_version']}"
    )
    click.echo(f"{'layer':<48}{'C':>6}{'min':>10}{'max':>10}{'widest step':>13}{'widest/narrowest':>18}")
    for r in rows[:top]:
        click.echo(f"{r.name:<48}{r.channels:>6}{r.lo:>10.3f}{r.hi:>10.3f}{r.widest_step:>13}{r.spread:>18.2f}")
    if plot_layer:
        if output is None:
            raise QexportError("--plot needs -o FILE.png")
        plot(stats, plot_layer, output)
        click.echo(f"wrote {output}")


@cli.command()
@click.argument("parts", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("-o", "--output", type=click.Path(path_type=Path), required=True)
def merge(parts: tuple[Path, ...], output: Path) -> None:
    """Merge .qstats shards exactly (min of mins, max of maxes, count-weighted means)."""
    from qexport.calib.store import load, merge_all, save

    merged = merge_all([load(p) for p in parts])
    size = save(merged, output)
    click.echo(
        f"wrote {output} ({size / 1024:.0f} KiB): {len(parts)} parts, {merged.header['samples']} samples, "
        f"shard {merged.header['shard'] or 'all'}"
    )


@cli.command()
def recipes() -> None:
    """List the recipe presets and the techniques a recipe can use (docs/recipes.md)."""
    from qexport.summaries import recipes_lines

    for line in recipes_lines():
        click.echo(line)


@cli.command()
@click.argument("stats_file", type=click.Path(path_type=Path))
@click.option("--recipe", "recipe_name", help="A preset (qexport recipes lists them) or a recipe .yaml file; "
              "default: W8A8, one model per step, no technique.")  # fmt: skip
@click.option("--set", "assignments", multiple=True, metavar="KEY=VALUE",
              help="Change one recipe key, e.g. bits.weights=4, smoothquant.alpha=auto, gptq=on "
              "(repeatable).")  # fmt: skip
@click.option("--target", help="Target profile, replacing the recipe's (qexport targets lists them).")
@click.option("-o", "--output", type=click.Path(path_type=Path), help="The build folder.")
@click.option("--dump-recipe", type=click.Path(path_type=Path),
              help="Write the resolved recipe as YAML (without -o, only that).")  # fmt: skip
@click.option("--force", is_flag=True, help="Replace an existing output folder.")
@click.option("--no-verify", is_flag=True, help="Skip the verification run at the end.")
@click.option("--prompt", "verify_prompt", help="Prompt / label for verification (default: a built-in one).")
@click.option(
    "--device",
    "device",
    default="cpu",
    show_default=True,
    help="Where torch runs the build's replay of calibration prompts (searches, observers, GPTQ's "
    "inputs, rotations, attention ranges): cpu or cuda.",
)
@click.option("--verify-device", default=None,
              help="Where torch runs verification's FP and simulated passes, and traces a pipeline (cuda for "
              "full-size models); default: --device.")  # fmt: skip
@model_options
@alias_options
def build(
    stats_file: Path,
    recipe_name: str | None,
    assignments: tuple[str, ...],
    target: str | None,
    output: Path | None,
    dump_recipe: Path | None,
    force: bool,
    no_verify: bool,
    verify_prompt: str | None,
    device: str,
    verify_device: str | None,
    model: str | None,
    trust_model_path: bool,
    **old: object,
) -> None:
    """Fold smoothing, quantize and emit one QDQ ONNX per step or per time range, as a recipe says."""
    from qexport.exporter.build import BuildConfig
    from qexport.exporter.build import build as run_build
    from qexport.models.registry import ModelRequest
    from qexport.recipe import Recipe, load_recipe, with_settings
    from qexport.recipe import dump_recipe as write_recipe
    from qexport.stages import stage_clock
    from qexport.summaries import build_lines, legality_lines, stage_lines

    start = time.perf_counter()
    base = load_recipe(recipe_name) if recipe_name else Recipe()
    changes = [*alias_assignments(old), *assignments, *([f"target={target}"] if target else [])]
    recipe = with_settings(base, changes)
    if dump_recipe is not None:
        write_recipe(recipe, dump_recipe)
        click.echo(f"wrote {dump_recipe}")
        if output is None:
            return
    if output is None:
        raise QexportError("give -o FOLDER for the build (or only --dump-recipe FILE to write the recipe)")
    existing_file(stats_file, "statistics file", "make one with qexport calibrate")
    check_device(device, "--device")
    verify_device = check_device(verify_device or device, "--verify-device")
    conditions = () if no_verify or verify_prompt is None else (verify_prompt,)
    request = ModelRequest(model=model, trust_model_path=trust_model_path, conditions=conditions)
    config = BuildConfig(recipe=recipe, force=force, device=device)
    printer = ProgressPrinter()
    with stage_clock() as clock:
        if _from_pipeline(stats_file):
            from qexport.exporter.pipeline_build import build_pipeline

            # the pipeline traced where verification runs
            result = build_pipeline(stats_file, output, config, progress=printer, device=verify_device, model=request)
        else:
            result = run_build(stats_file, output, config, progress=printer, model=request)  # type: ignore[assignment]
    printer.close()
    lines = [*build_lines(result.manifest, result.seconds, str(output)), *stage_lines(clock.seconds, result.seconds)]
    for line in [*lines, *legality_lines(result.manifest)]:
        click.echo(line)
    if not no_verify:
        plans = [r.plan for r in result.ranges]
        _verify_and_report(output, result.adapter, plans, result.manifest, verify_prompt, device=verify_device)
    click.echo(f"time: {duration(time.perf_counter() - start)} in all")


def _from_pipeline(stats_file: Path) -> bool:
    """Whether a .qstats file was calibrated through a diffusers pipeline's own loop."""
    from qexport.calib.store import load

    return "pipeline" in load(stats_file).header


def _verify_and_report(
    folder: Path,
    adapter: object,
    plans: list,
    manifest: dict,
    prompt: str | None,
    only: list[int] | None = None,
    runtime: str = "onnxruntime",
    device: str = "cpu",
    threads: int | None = None,
) -> None:
    from qexport.exporter.manifest import write_manifest
    from qexport.media import folder_lock
    from qexport.models.fp_eval import default_prompts
    from qexport.summaries import verification_table
    from qexport.targets.catalog import get_profile
    from qexport.verification.pipeline_verify import DEFAULT_PROMPT, verify_pipeline
    from qexport.verification.verify import verify as run_verify

    pipeline = "pipeline" in manifest
    if prompt is None:
        prompt = DEFAULT_PROMPT if pipeline else default_prompts(adapter)[0]  # type: ignore[arg-type]
    where = "onnxruntime" + ("" if runtime == "onnxruntime" else f" and {runtime}")
    with folder_lock(folder):  # no build or other verify rewrites the folder meanwhile
        printer = ProgressPrinter()
        count = len(plans) if only is None else len(set(only))
        printer.say(f"verifying {count} model(s) on {where} (prompt {prompt!r})")
        target = get_profile(manifest["target"])
        if pipeline:
            v = verify_pipeline(folder, adapter, plans, manifest, target, prompt, threads=threads,  # type: ignore[arg-type]
                                progress=printer, only=only, device=device)  # fmt: skip
        else:
            v = run_verify(folder, adapter, plans, manifest, target, prompt, only=only, runtime=runtime, device=device,  # type: ignore[arg-type]
                           threads=threads, progress=printer)  # fmt: skip
        printer.close()
        manifest["verification"] = {"prompt": prompt, "runtime": runtime, **v.to_json()}
        write_manifest(folder, manifest)
    for line in verification_table(manifest["verification"]):
        click.echo(line)
    if not v.ok:
        raise QexportError(f"verification failed for {folder}; see the table above")


@cli.command()
@click.argument("folder", type=click.Path(path_type=Path))
@click.option("--stats", "stats_file", type=click.Path(path_type=Path), help="The .qstats the build used.")
@click.option("--prompt", help="Prompt / label to verify with.")
@click.option("--models", "only", help="Verify only these models, by index (e.g. 0,19: first and last step); "
              "skips the end-to-end loop.")  # fmt: skip
@click.option(
    "--runtime",
    type=click.Choice(["onnxruntime", "openvino", "qnn-htp"]),
    default="onnxruntime",
    show_default=True,
    help="openvino: also run every model in OpenVINO's CPU runtime and compare it with onnxruntime; qnn-htp: "
    "also on Qualcomm's HTP backend (onnxruntime-qnn, CPU fallback off), the end-to-end loop too.",
)
@click.option("--device", default="cpu", show_default=True,
              help="Where torch runs the FP and simulated passes (cuda for full-size models).")  # fmt: skip
@click.option("--threads", type=int, help="CPU threads of onnxruntime and torch (default: their own choice).")
@model_options
def verify(
    folder: Path,
    stats_file: Path | None,
    prompt: str | None,
    only: str | None,
    runtime: str,
    device: str,
    threads: int | None,
    model: str | None,
    trust_model_path: bool,
) -> None:
    """Prove onnxruntime runs integer kernels; compare with the simulation and with FP."""
    from qexport.exporter.build import replan
    from qexport.models.registry import ModelRequest
    from qexport.runtime.manifest import read_manifest
    from qexport.verification.verify import check_verify_request

    start = time.perf_counter()
    indexes = None if only is None else _ints(only, "--models")
    set_threads(threads)
    manifest = read_manifest(folder)
    check_verify_request(manifest, runtime, indexes)
    check_device(device, "--device")
    conditions = () if prompt is None else (prompt,)
    request = ModelRequest(model=model, trust_model_path=trust_model_path, conditions=conditions)
    request.model_id(str(manifest["model_id"]), str(folder / "manifest.json"), "built from it")  # consent, named here
    if "pipeline" in manifest:
        from qexport.exporter.pipeline_build import replan_pipeline

        adapter, plans = replan_pipeline(manifest, stats_file, device, model=request, folder=folder)
    else:
        adapter, plans, _ = replan(manifest, stats_file, model=request, folder=folder, device=device)  # type: ignore[assignment]
    _verify_and_report(folder, adapter, plans, manifest, prompt, indexes, runtime, device, threads)
    click.echo(f"time: {duration(time.perf_counter() - start)} in all")


@cli.group(invoke_without_command=True)
@click.pass_context
def targets(ctx: click.Context) -> None:
    """List the target profiles (qexport targets show T prints one)."""
    from qexport.summaries import targets_table
    from qexport.targets.catalog import PROFILES

    if ctx.invoked_subcommand is None:
        for line in targets_table(list(PROFILES.values())):
            click.echo(line)


@targets.command(name="show")
@click.argument("name")
def targets_show(name: str) -> None:
    """Print one target profile: its rules and the documents they come from."""
    from qexport.summaries import profile_lines
    from qexport.targets.catalog import get_profile

    for line in profile_lines(get_profile(name)):
        click.echo(line)


@cli.command()
@click.argument("folder", type=click.Path(path_type=Path))
@click.option("--mode", type=click.Choice(["per-model", "shared"]), default="per-model", show_default=True,
              help="per-model: one context binary per step model; shared: every step graph in one binary, "
              "the weights they share stored once.")  # fmt: skip
@click.option("--force", is_flag=True, help="Replace the build's existing contexts.")
def contexts(folder: Path, mode: str, force: bool) -> None:
    """Compile a qnn-htp build's step models into QNN context binaries (EPContext) for HTP, then load
    each back in a child process and check its output equals the compiling session's."""
    import shutil

    from qexport.exporter.manifest import write_manifest
    from qexport.exporter.qnn_context import FOLDER, compile_contexts
    from qexport.media import folder_lock
    from qexport.runtime.manifest import read_manifest

    start = time.perf_counter()
    with folder_lock(folder):  # no build or verify rewrites the folder meanwhile
        manifest = read_manifest(folder)
        if (folder / FOLDER).exists() and force:
            shutil.rmtree(folder / FOLDER)
        entry = compile_contexts(folder, manifest, mode)
        manifest["contexts"] = entry
        write_manifest(folder, manifest)
    sizes = entry["binaries"]
    click.echo(f"{len(entry['models'])} context model(s), {len(sizes)} binar{'y' if len(sizes) == 1 else 'ies'} "
               f"{sum(sizes.values()) / 2**20:.2f} MiB in {folder / FOLDER} (QNN SDK {entry['sdk']}); "
               f"{duration(time.perf_counter() - start)}")  # fmt: skip
    if entry["loaded"] is not True:
        raise QexportError(f"load check: {entry['loaded']}; the files are kept for a device whose HTP loads them")
    worst = max(entry["max_abs_diff"].values())
    click.echo(f"load check: every context loads and runs; largest difference from the compiling session {worst:g}")


@cli.command()
@click.argument("folder", type=click.Path(path_type=Path))
@click.option("--prompt", help="Caption (text-to-video builds).")
@click.option("--label", help="Class label (class-conditional builds).")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--threads", type=int, default=None, help="onnxruntime intra-op threads (default: its own choice).")
@click.option("--runtime", type=click.Choice(["onnxruntime", "qnn-htp"]), default="onnxruntime", show_default=True,
              help="qnn-htp: the step models on Qualcomm's HTP backend (onnxruntime-qnn), from their context "
              "binaries when the build has them (qexport contexts).")  # fmt: skip
@click.option("--allow-unverified", is_flag=True,
              help="Run a build whose verification was skipped, interrupted or failed (else refused).")  # fmt: skip
@click.option("-o", "--output", type=click.Path(path_type=Path), required=True, help="clip.gif or image.png")
def run(
    folder: Path,
    prompt: str | None,
    label: str | None,
    seed: int,
    threads: int | None,
    runtime: str,
    allow_unverified: bool,
    output: Path,
) -> None:
    """The edge loop: manifest.json + ONNX files, numpy + onnxruntime only."""
    from qexport.media import output_paths, save_gif, save_png, strip
    from qexport.runtime.conditioning import Conditioning
    from qexport.runtime.loop import Pipeline, decode_pixels
    from qexport.runtime.verified import check_verified

    start = time.perf_counter()
    from qexport.runtime.manifest import read_manifest

    manifest = read_manifest(folder)
    if warning := check_verified(folder, manifest, allow_unverified):
        click.echo(warning, err=True)
    if "pipeline" in manifest:
        if runtime != "onnxruntime":
            raise QexportError(f"a pipeline build runs on onnxruntime's CPU provider; --runtime {runtime} is not "
                               "supported for it")  # fmt: skip
        _run_pipeline(folder, manifest, {"prompt": prompt, "label": label}, seed, output, check_threads(threads))
        click.echo(f"wrote {output} in {duration(time.perf_counter() - start)}")
        return
    opener = None
    if runtime == "qnn-htp":
        from qexport.runtime.qnn import model_opener
        from qexport.targets.catalog import get_profile

        get_profile(str(manifest.get("target"))).check_htp()
        opener = model_opener(folder, manifest)
    pipeline = Pipeline(folder, threads=check_threads(threads), manifest=manifest, open_model=opener)
    m = pipeline.manifest
    text = conditioning_text((m.get("conditioning") or {}).get("kind", "caption"), prompt, label)
    paths = output_paths(output, len(m["latent_shape"]) == 4)
    conditioning = Conditioning(folder, m)
    printer = ProgressPrinter()
    result = pipeline.run(conditioning.encode(text), conditioning.null(), seed, progress=printer)
    printer.close()
    pixels = decode_pixels(result.latents, m)
    if pixels.ndim == 4:
        save_gif(paths[0], pixels)
        save_png(paths[1], strip(pixels))
    else:
        save_png(paths[0], pixels)
    steps = result.step_seconds
    click.echo(
        f"wrote {' and '.join(map(str, paths))}: {len(steps)} steps, {1e3 * sum(steps) / len(steps):.0f} ms/step "
        f"(first {1e3 * steps[0]:.0f} ms); model loading not hidden by the prefetch "
        f"{1e3 * sum(result.swap_seconds):.0f} ms; {duration(time.perf_counter() - start)} in all"
    )


def _run_pipeline(
    folder: Path, m: dict[str, Any], given: dict[str, str | None], seed: int, output: Path, threads: int | None
) -> None:
    """`run` of a pipeline build: text parts (or a class label), transformer, scheduler block, VAE;
    `given` holds the --prompt and --label options."""
    import numpy as np

    from qexport.media import output_paths, save_gif, save_png, strip
    from qexport.runtime.loop import initial_noise
    from qexport.runtime.pipeline_loop import PipelineLoop
    from qexport.runtime.scheduler import EdgeScheduler

    labels = "labels" in m["pipeline"]
    takes, other = ("label", "prompt") if labels else ("prompt", "label")
    condition = given[takes]
    if not condition or given[other]:
        what = (
            "a class label: pass --label (a class id or a name of its id2label)"
            if labels
            else "a caption: pass --prompt"
        )
        raise QexportError(f"this build takes {what}" + (f", not --{other}" if given[other] else ""))
    start = EdgeScheduler.of(m, seed).start(initial_noise(tuple(m["latent_shape"]), seed))[None]
    _, images = PipelineLoop(folder, m, threads).run(condition, start)
    if images is None:
        raise QexportError(f"{folder} ships no VAE decoder; nothing to write")
    pixels = (images * 255).round().astype(np.uint8)
    paths = output_paths(output, len(pixels) > 1)
    if len(pixels) > 1:
        save_gif(paths[0], pixels)
        save_png(paths[1], strip(pixels))
    else:
        save_png(paths[0], pixels[0])


@cli.command(name="export-fp")
@click.argument("folder", type=click.Path(path_type=Path))
@click.option("-o", "--output", type=click.Path(path_type=Path), required=True, help="The build folder (new).")
@click.option(
    "--prompt", default="a photo of a cat", show_default=True, help="The caption the pipeline is traced with."
)
@click.option("--steps", type=int, default=20, show_default=True)
@click.option("--call", "calls", multiple=True, metavar="KEY=VALUE",
              help="Another argument of the pipeline's __call__ (height=512, guidance_scale=4.5, ...).")  # fmt: skip
def export_fp(folder: Path, output: Path, prompt: str, steps: int, calls: tuple[str, ...]) -> None:
    """FP edge build of a diffusers pipeline folder: text parts, transformer, scheduler, VAE (no quantization yet)."""
    from qexport.exporter.pipeline_parts import export_fp_pipeline

    start = time.perf_counter()
    manifest = export_fp_pipeline(folder, output, prompt, steps, pipeline_call(calls))
    p = manifest["pipeline"]
    inputs = ", ".join(f"{i['name']} <- {i['source']}" for c in p["calls"][:1] for i in c["inputs"])
    click.echo(f"{p['class']}: {len(p['text'])} text part(s), transformer inputs {inputs}; CFG {p['cfg']}")
    click.echo(f"wrote {output} in {duration(time.perf_counter() - start)}")


@cli.command(name="eval")
@click.argument("folders", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--prompts", "prompts_file", type=click.Path(path_type=Path), help="Captions, one per line.")
@click.option("--labels", help="Comma-separated class labels.")
@click.option("--seeds", default="0", show_default=True)
@click.option("-o", "--output", type=click.Path(path_type=Path), default=Path("eval.json"), show_default=True)
@click.option(
    "--report",
    type=click.Path(path_type=Path),
    help="Where report.html goes (default: report.html beside the JSON).",
)
@click.option("--threads", type=int, help="CPU threads of onnxruntime and torch (default: their own choice).")
@model_options
def eval_(
    folders: tuple[Path, ...],
    prompts_file: Path | None,
    labels: str | None,
    seeds: str,
    output: Path,
    report: Path | None,
    threads: int | None,
    model: str | None,
    trust_model_path: bool,
) -> None:
    """Accuracy of builds vs FP from the same noise (default prompts: the built-in evaluation set)."""
    from qexport.models.registry import ModelRequest
    from qexport.runtime.manifest import read_manifest

    request = ModelRequest(model=model, trust_model_path=trust_model_path)
    start = time.perf_counter()
    printer = ProgressPrinter()
    seed_list = _seeds(seeds)
    kind = read_manifest(folders[0])["inputs"][1]["dtype"]
    if prompts_file is None and labels is None:
        from qexport.models import shapes

        prompts = shapes.class_names() if kind == "int64" else shapes.eval_prompts()
    else:
        prompts = _prompts(prompts_file, labels)
    printer.say(f"evaluating {len(folders)} build(s) on {len(prompts)} prompt(s) x {len(seed_list)} seed(s)")
    set_threads(threads)
    from qexport.summaries import eval_table
    from qexport.verification.evaluate import evaluate, write_json
    from qexport.verification.report import write_report

    report = output.with_name("report.html") if report is None else report
    manifests = {str(f): read_manifest(f) for f in folders}
    result = evaluate(list(folders), prompts, seed_list, progress=printer, threads=threads, model=request)
    printer.close()
    write_json(result, output)
    write_report(report, result.to_json(), result.first_samples, manifests)
    for line in eval_table(result.to_json()):
        click.echo(line)
    from qexport.runtime.verified import unverified

    for folder, m in manifests.items():
        if why := unverified(Path(folder), m):
            click.echo(f"note: {why}: these are figures of an unverified build")
    click.echo(f"wrote {output} and {report} in {duration(time.perf_counter() - start)}")


@cli.command()
@click.option("-o", "--output", type=click.Path(path_type=Path), default=Path("qexport-demo"), show_default=True)
@click.option("--force", is_flag=True, help="Replace an existing demo folder.")
@click.option("--threads", type=int, help="CPU threads of onnxruntime and torch (default: their own choice).")
def demo(output: Path, force: bool, threads: int | None) -> None:
    """The whole path on the built-in tiny-latte: calibrate, build, verify, eval, report."""
    from qexport.demo import demo as run_demo
    from qexport.summaries import eval_table, verification_table

    start = time.perf_counter()
    set_threads(threads)
    printer = ProgressPrinter()
    result = run_demo(output, force=force, threads=threads, progress=printer)
    printer.close()
    click.echo("")
    for line in verification_table(result.verification):
        click.echo(line)
    click.echo("")
    for line in eval_table(result.evaluation):
        click.echo(line)
    phases = ", ".join(f"{k} {v:.0f}s" for k, v in result.seconds.items())
    int8 = sum(m["integer"] for m in result.verification["models"])
    click.echo(
        f"\nsummary: {len(result.verification['models'])} step models, {int8} quantized layer-models on "
        f"integer kernels (MatMulIntegerToFloat), verdict {'PASS' if result.verification['ok'] else 'FAIL'}"
    )
    click.echo(f"time: {duration(time.perf_counter() - start)} ({phases})")
    click.echo(f"report: {result.report.resolve()}")


@cli.command()
@click.argument("stats_file", type=click.Path(path_type=Path))
@click.option(
    "--methods",
    default="CW+TW,+TSW,+ASQ,+TSQ+TSW",
    show_default=True,
    help="Also: Dynamic (activations quantized per token at run time: the seed paper's baseline, not NPU-static), "
    "PTQ4DiT (its salience balancing), ASQ and DuQuant (one model each), and the weight formats on CW+TW: "
    "Q-DiT (group-wise), VQ4DiT (codebook), TwinLog (LRQ-DiT's twin-log weights).",
)
@click.option("--bits", default="W8A8,W4A8", show_default=True, help="e.g. W8A8,W6A8,W4A8,W8A16,W6A6,W4A6,W4A4")
@click.option("--time-ranges", "ranges", default="", help="e.g. 1,2,4,10,20 (instead of per step)")
@click.option(
    "--prompts", "prompts_file", type=click.Path(path_type=Path), help="Evaluation captions (default: built-in set)."
)
@click.option("--labels", help="Evaluation class labels.")
@click.option("--seeds", default="0", show_default=True)
@click.option("--alpha", type=float, default=0.5, show_default=True)
@click.option("-o", "--output", type=click.Path(path_type=Path), default=Path("sweep"), show_default=True)
@model_options
def sweep(
    stats_file: Path,
    methods: str,
    bits: str,
    ranges: str,
    prompts_file: Path | None,
    labels: str | None,
    seeds: str,
    alpha: float,
    output: Path,
    model: str | None,
    trust_model_path: bool,
) -> None:
    """Build and evaluate a grid (methods x bits x ranges); writes the paper's table shapes."""
    from qexport.calib.store import load
    from qexport.models import shapes
    from qexport.models.registry import ModelRequest
    from qexport.sweep import grid, paper_tables
    from qexport.sweep import sweep as run_sweep
    from qexport.verification.evaluate import write_json

    cells = grid([m for m in methods.split(",") if m], [b for b in bits.split(",") if b],
                 [int(r) for r in ranges.split(",") if r.strip()])  # fmt: skip
    if prompts_file is None and labels is None:
        kind = load(stats_file).header.get("class_name")
        prompts = shapes.class_names() if kind == "DiTTransformer2DModel" else shapes.eval_prompts()
    else:
        prompts = _prompts(prompts_file, labels)
    request = ModelRequest(model=model, trust_model_path=trust_model_path, conditions=tuple(prompts))
    start, printer = time.perf_counter(), ProgressPrinter()
    result, folders = run_sweep(stats_file, cells, output, prompts, _seeds(seeds), alpha, progress=printer,
                                model=request)  # fmt: skip
    printer.close()
    write_json(result, output / "sweep.json")
    data = result.to_json()
    data["builds"] = {folders[k].name: v for k, v in data["builds"].items()}
    from qexport.summaries import eval_table

    for line in eval_table(data):
        click.echo(line)
    tables = "\n".join(paper_tables(result.to_json(), folders))
    from qexport.media import atomic_write

    atomic_write(output / "tables.md", lambda p: Path(p).write_text(tables))
    click.echo(tables)
    click.echo(f"wrote {output / 'sweep.json'} and {output / 'tables.md'} in {duration(time.perf_counter() - start)}")


def main() -> None:
    """Entry point: one clear error line and a non-zero exit; tracebacks only with --debug."""
    try:
        cli.main(standalone_mode=False)
    except QexportError as exc:
        if "--debug" in sys.argv:
            raise
        click.echo(f"error: {exc}", err=True)
        sys.exit(2)
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        # not sys.exit: under `python -m`, CPython turns the exit into a SIGINT death when the
        # interrupt first surfaced inside a C extension's PyRun_* call, and the status is then -2
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(130)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
