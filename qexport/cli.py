"""The ``qexport`` command line: each command parses, calls one library function, prints a summary."""

from __future__ import annotations

import logging
import sys
import time
from pathlib import Path

import click

from qexport import __version__
from qexport.errors import QexportError

log = logging.getLogger("qexport")


def _seeds(text: str) -> list[int]:
    try:
        return [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise QexportError(f"--seeds must be comma-separated integers, got {text!r}") from None


@click.group()
@click.version_option(__version__, prog_name="qexport")
@click.option("--debug", is_flag=True, help="Show tracebacks and debug logs.")
@click.pass_context
def cli(ctx: click.Context, debug: bool) -> None:
    """Static-quantization export of diffusion transformers to ONNX for NPUs."""
    logging.basicConfig(level=logging.DEBUG if debug else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    from diffusers.utils import logging as dlogging

    dlogging.set_verbosity_error()
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
    from qexport.media import save_gif, save_png, strip
    from qexport.models.registry import load_model
    from qexport.models.sampler import SamplingConfig
    from qexport.models.sampler import sample as run_sampler

    config = SamplingConfig(steps=steps, cfg=cfg)
    text = prompt if prompt is not None else label
    if text is None:
        raise QexportError("give --prompt (text-to-video models) or --label (class-conditional models)")
    adapter = load_model(model_name)
    cond = adapter.conditioner.encode([text])
    start = time.perf_counter()
    with click.progressbar(length=steps, label=f"sampling {adapter.model_id}", file=sys.stderr) as bar:
        latents = run_sampler(adapter, cond, [seed], config, on_step=lambda i, t: bar.update(1))
    pixels = adapter.decode(latents)[0]
    elapsed = time.perf_counter() - start
    if adapter.is_video:
        gif = output.with_suffix(".gif")
        save_gif(gif, pixels)
        png = output.with_suffix(".png")
        save_png(png, strip(pixels))
        click.echo(f"wrote {gif} and {png} ({len(pixels)} frames, {steps} steps, {elapsed:.1f}s)")
    else:
        png = output.with_suffix(".png")
        save_png(png, pixels)
        click.echo(f"wrote {png} ({steps} steps, {elapsed:.1f}s)")


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
    with click.progressbar(length=len(prompts) * len(seed_list), label="sampling", file=sys.stderr) as bar:
        result = evaluate_fp(adapter, prompts, seed_list, config, batch_size=batch_size, progress=bar.update)
    r = result.report
    click.echo(f"{adapter.model_id}: {r.count} samples, {steps} steps, CFG {cfg}, {time.perf_counter() - start:.0f}s")
    for key, value in r.accuracy.items():
        click.echo(f"  {key:<22}{value:.3f}")
    click.echo(f"  {'adherence':<22}{r.adherence:.3f}")
    if r.temporal_consistency is not None:
        click.echo(f"  {'temporal consistency':<22}{r.temporal_consistency:.3f}")


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
        sys.exit(130)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
