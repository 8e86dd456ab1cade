"""A whole diffusers pipeline at full size, random weights: the folder (transformer, text encoder,
VAE, scheduler, a generated tokenizer) saved by the pipeline's own save_pretrained, calibrated
through its own __call__, built as per-step W8A8 models with its text encoder and VAE as edge parts
(W8A8 ASQ + TSW: one weight set stored once for all steps), and a subset of the step models verified. Time, peak host
memory (RSS; the process's and, sampled every 0.5 s, the phase's own) and disk of each phase go to one JSON
file; `--rss-log` keeps the RSS timeline by function, so a run killed for memory still shows where it went.

    python bench/full_pipeline.py --config pixart-alpha-512 --root /tmp/full --device cuda --json full.json

Configs: ``pixart-alpha-512`` (PixArt-α 512 px, a T5-XXL-sized encoder, SD's VAE), ``latte-1``
(Latte-1, the same encoder and VAE; 512x512, 16 frames) and ``wan2.1-1.3b`` (Wan2.1-T2V-1.3B, a
UMT5-XXL-sized encoder, Wan's 3-D VAE; 480x832, 17 frames). CPU rehearsals: ``tiny-pixart`` (the
tests' tiny PixArt-α folder) and ``wan2.1-1.3b-cpu`` (Wan's full-size transformer, a one-layer
encoder, a tiny VAE, 16x16 px; with ``--stop-after export`` it ends after the FP export and prepare),
``wan2.1-1.3b-steps`` (the same small encoder and VAE at Wan's full 480x832, 17 frames: the step
models at full size without the UMT5-XXL part's build time and memory)
and ``latte-1-cpu`` (Latte-1's full-size transformer the same way, 16 frames of 16x16 px).
Weights are random ([random-init]): the figures are cost, not accuracy.
"""

from __future__ import annotations

import argparse
import faulthandler
import importlib.util
import json
import resource
import time
from pathlib import Path
from typing import Any

import torch

PROMPTS = ("a red circle", "a blue square")  # short: the tiny folder's tokenizer takes 16 tokens
CALLS: dict[str, dict[str, Any]] = {
    "pixart-alpha-512": {"height": 512, "width": 512, "guidance_scale": 4.5, "use_resolution_binning": False,
                         "clean_caption": False, "max_sequence_length": 120},
    "wan2.1-1.3b": {"height": 480, "width": 832, "num_frames": 17, "guidance_scale": 5.0, "max_sequence_length": 512},
    "wan2.1-1.3b-steps": {"height": 480, "width": 832, "num_frames": 17, "guidance_scale": 5.0,
                          "max_sequence_length": 512},
    "wan2.1-1.3b-cpu": {"height": 16, "width": 16, "num_frames": 5, "guidance_scale": 5.0, "max_sequence_length": 16},
    "latte-1": {"height": 512, "width": 512, "video_length": 16, "guidance_scale": 7.5, "clean_caption": False,
                "mask_feature": False},  # mask_feature=False: caption embeddings at their padded length (120)
    "latte-1-cpu": {"height": 16, "width": 16, "video_length": 16, "guidance_scale": 7.5, "clean_caption": False,
                    "mask_feature": False},
    "tiny-pixart": {"height": 8, "width": 8, "guidance_scale": 4.5, "use_resolution_binning": False,
                    "clean_caption": False, "max_sequence_length": 16},
}  # fmt: skip
T5_XXL = {"d_model": 4096, "d_kv": 64, "d_ff": 10240, "num_layers": 24, "num_heads": 64,
          "relative_attention_num_buckets": 32, "relative_attention_max_distance": 128}  # fmt: skip
WAN_1_3B = {
    "patch_size": (1, 2, 2),
    "num_attention_heads": 12,
    "attention_head_dim": 128,
    "in_channels": 16,
    "out_channels": 16,
    "text_dim": 4096,
    "freq_dim": 256,
    "ffn_dim": 8960,
    "num_layers": 30,
    "cross_attn_norm": True,
    "qk_norm": "rms_norm_across_heads",
    "eps": 1e-6,
    "rope_max_seq_len": 1024,
}
UMT5_XXL = {**T5_XXL, "vocab_size": 256384}
UMT5_CPU = {**T5_XXL, "num_layers": 1, "num_heads": 2, "d_ff": 64}  # XXL's width (Wan's text_dim), one small layer
T5_CPU = {**UMT5_CPU, "vocab_size": 32128}  # the same for Latte's caption_channels
WAN_VAE: dict[str, Any] = {}  # AutoencoderKLWan's defaults: the checkpoint's config
TINY_WAN_VAE = {"base_dim": 3, "z_dim": 16, "dim_mult": [1, 1, 1, 1], "num_res_blocks": 1}  # the tests' Wan VAE
LATTE_1 = {"num_attention_heads": 16, "attention_head_dim": 72, "in_channels": 4, "out_channels": 8,
           "num_layers": 28, "cross_attention_dim": 1152, "attention_bias": True, "sample_size": 64,
           "patch_size": 2, "activation_fn": "gelu-approximate", "num_embeds_ada_norm": 1000,
           "norm_type": "ada_norm_single", "norm_elementwise_affine": False, "norm_eps": 1e-6,
           "caption_channels": 4096, "video_length": 16}  # fmt: skip  # maxin-cn/Latte-1 transformer/config.json
LATTE_1_DDIM = {"beta_start": 0.0001, "beta_end": 0.02, "beta_schedule": "linear", "num_train_timesteps": 1000,
                "prediction_type": "epsilon", "timestep_spacing": "leading", "clip_sample": False}  # fmt: skip
SD_VAE = {"block_out_channels": (128, 256, 512, 512), "layers_per_block": 2, "latent_channels": 4,
          "norm_num_groups": 32, "sample_size": 512, "scaling_factor": 0.18215,
          "down_block_types": ("DownEncoderBlock2D",) * 4, "up_block_types": ("UpDecoderBlock2D",) * 4}  # fmt: skip


def _peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _disk(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def _load(relative: str, name: str) -> Any:
    """A module of this repository by path (bench scripts run with -P, so not by import)."""
    path = Path(__file__).resolve().parent.parent / relative
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _test_pipelines() -> Any:
    """tests/pipelines.py: the generated tokenizers and the tiny folders the test suite uses."""
    return _load("tests/pipelines.py", "qexport_test_pipelines")


def _t5(tests: Any, tokenizer: Any, size: dict[str, Any], umt5: bool = False) -> Any:
    """A (UM)T5 encoder of `size` over the tests' generated tokenizer's config."""
    import transformers

    config = {**tests._t5_config(tokenizer), **size}
    if umt5:
        return transformers.UMT5EncoderModel(transformers.UMT5Config(**config)).eval()
    return transformers.T5EncoderModel(transformers.T5Config(**config)).eval()


def _wan(tests: Any, tokenizer: Any, encoder: dict[str, Any], vae: dict[str, Any]) -> Any:
    """Wan2.1-T2V-1.3B's transformer with the given UMT5 size and Wan VAE config."""
    import diffusers

    scheduler = diffusers.UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True,
                                                  flow_shift=3.0, num_train_timesteps=1000)  # fmt: skip
    return diffusers.WanPipeline(tokenizer=tokenizer, text_encoder=_t5(tests, tokenizer, encoder, umt5=True),
                                 vae=diffusers.AutoencoderKLWan(**vae).eval(), scheduler=scheduler,
                                 transformer=diffusers.WanTransformer3DModel(**WAN_1_3B).eval())  # fmt: skip


def _pipeline(config: str, tests: Any, tokenizer: Any) -> Any:
    """The random-init pipeline of a full-size config (built under the caller's torch.device)."""
    import diffusers

    from qexport.models.architectures import FULL_SIZE

    if config == "wan2.1-1.3b":  # Wan2.1-T2V-1.3B: its transformer, UMT5-XXL, the 3-D causal VAE
        return _wan(tests, tokenizer, UMT5_XXL, WAN_VAE)
    if config in ("wan2.1-1.3b-cpu", "wan2.1-1.3b-steps"):  # the same transformer; a one-layer UMT5 of XXL
        return _wan(tests, tokenizer, UMT5_CPU, TINY_WAN_VAE)  # width, a tiny VAE
    if config == "latte-1-cpu":  # Latte-1's transformer; a one-layer T5 of XXL width, the tests' tiny VAE
        return diffusers.LattePipeline(tokenizer=tokenizer, text_encoder=_t5(tests, tokenizer, T5_CPU),
                                       vae=tests.kl_vae(), scheduler=diffusers.DDIMScheduler(**LATTE_1_DDIM),
                                       transformer=diffusers.LatteTransformer3DModel(**LATTE_1).eval())  # fmt: skip
    t5 = _t5(tests, tokenizer, {**T5_XXL, "vocab_size": 32128})
    vae = diffusers.AutoencoderKL(in_channels=3, out_channels=3, **SD_VAE).eval()
    if config == "latte-1":  # Latte-1: T5-XXL, SD's VAE frame by frame, the checkpoint's DDIM
        transformer = diffusers.LatteTransformer3DModel(**LATTE_1).eval()
        return diffusers.LattePipeline(tokenizer=tokenizer, text_encoder=t5, vae=vae, transformer=transformer,
                                       scheduler=diffusers.DDIMScheduler(**LATTE_1_DDIM))  # fmt: skip
    class_name, transformer_config, _ = FULL_SIZE[config]
    transformer = getattr(diffusers, class_name)(**transformer_config).eval()
    return diffusers.PixArtAlphaPipeline(tokenizer=tokenizer, text_encoder=t5, vae=vae, transformer=transformer,
                                         scheduler=tests._pixart_scheduler())  # fmt: skip


def make_folder(config: str, root: Path, device: str) -> Path:
    """The pipeline folder of a named config, random weights (seed 0), initialised on `device`."""
    tests = _test_pipelines()
    if config == "tiny-pixart":
        return Path(tests.FAMILIES["pixart-alpha"](root))
    tokenizer = tests.t5_tokenizer(max_length=512)
    torch.manual_seed(0)
    with torch.device(device):
        pipe = _pipeline(config, tests, tokenizer)
    pipe.to("cpu", torch.float16).save_pretrained(root / config)  # fp16 on disk; loaded back in fp32
    return root / config


def export_only(stats: Path, layers: list[str], device: str, phase: Any) -> None:
    """The build's first steps alone, as build_pipeline takes them: trace and bind the pipeline,
    the transformer's FP export, then prepare (shape inference, folding)."""
    from qexport.calib.store import load
    from qexport.exporter.fp_export import export_fp, prepare
    from qexport.exporter.pipeline_build import pipeline_adapter

    start = time.perf_counter()
    calibrated = load(stats)
    adapter = pipeline_adapter(calibrated, str(stats), calibrated.model_id, device)  # the folder this script made
    phase("trace", start)
    start = time.perf_counter()
    fp = export_fp(adapter, layers)
    phase("fp_export", start, nodes=len(fp.model.graph.node), model_bytes=sum(_tensor_bytes(fp.model)))
    start = time.perf_counter()
    prepared = prepare(fp)
    phase("prepare", start, nodes=len(prepared.model.graph.node))


def _tensor_bytes(model: Any) -> list[int]:
    from qexport.exporter.shapes import _data_bytes

    return [_data_bytes(t) for t in model.graph.initializer]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", choices=sorted(CALLS), required=True)
    parser.add_argument("--root", type=Path, required=True, help="a folder for the pipeline and the build")
    parser.add_argument("--device", default="cpu", help="where torch runs (cuda at full size)")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--verify", default="0,-1", help="step models to verify (-1: the last)")
    parser.add_argument("--json", type=Path, required=True)
    parser.add_argument("--stop-after", choices=("export",), help="end after the build's FP export and prepare")
    parser.add_argument("--stack-every", type=float, default=0, help="dump the Python stack every N s (0: never)")
    parser.add_argument("--rss-log", type=Path, help="a file for the RSS timeline (seconds, GiB, qexport function)")
    a = parser.parse_args()
    sampler = _load("bench/build_memory.py", "qexport_build_memory").Sampler(0.5, a.rss_log)
    sampler.start()
    if a.stack_every:
        faulthandler.dump_traceback_later(a.stack_every, repeat=True)

    from qexport.calib.pipeline import PipelineCalibConfig, calibrate_pipeline
    from qexport.calib.store import save
    from qexport.exporter.built import BuildConfig
    from qexport.exporter.pipeline_build import build_pipeline
    from qexport.targets.catalog import get_profile
    from qexport.verification.pipeline_verify import DEFAULT_PROMPT, verify_pipeline

    from qexport.models.registry import ModelRequest
    from qexport.recipe import load_recipe, with_settings

    result: dict[str, Any] = {"config": a.config, "device": a.device, "steps": a.steps, "random_init": True}

    def phase(name: str, start: float, **extra: Any) -> None:
        result[name] = {
            "seconds": round(time.perf_counter() - start, 1),
            "peak_rss_gib": _peak_rss() / 2**30,
            "phase_peak_rss_gib": sampler.window_peak() / 2**30,
            **extra,
        }
        print(name, json.dumps(result[name]), flush=True)
        a.json.write_text(json.dumps(result, indent=1))

    start = time.perf_counter()
    folder = make_folder(a.config, a.root / "pipeline", a.device)
    phase("folder", start, disk_bytes=_disk(folder))

    start = time.perf_counter()
    config = PipelineCalibConfig(prompts=PROMPTS, steps=a.steps, call=CALLS[a.config], device=a.device)
    calibrated = calibrate_pipeline(folder, config)
    stats = a.root / "run.qstats"
    phase("calibrate", start, layers=calibrated.hooked, qstats_bytes=save(calibrated.stats, stats))

    if a.stop_after == "export":
        export_only(stats, list(calibrated.stats.layers), a.device, phase)
        return

    start = time.perf_counter()
    recipe = with_settings(load_recipe("w8a8-tsq-tsw"), ["smoothquant.mode=asq"])  # one weight set for all steps
    own = ModelRequest(model=str(folder))  # the folder this script made and calibrated
    built = build_pipeline(stats, a.root / "build", BuildConfig(recipe=recipe), device=a.device, model=own)
    files = built.manifest["files"]
    shared, unshared = files["weights_bytes"], files["weights_bytes_without_sharing"]
    phase("build", start, models=len(built.ranges), disk_bytes=_disk(built.folder), weights_bytes=shared,
          weights_bytes_without_sharing=unshared)  # fmt: skip

    start = time.perf_counter()
    only = sorted({int(i) % len(built.ranges) for i in a.verify.split(",")})
    m = built.manifest
    v = verify_pipeline(built.folder, built.adapter, [r.plan for r in built.ranges], m, get_profile(m["target"]),
                        DEFAULT_PROMPT, only=only, device=a.device)  # fmt: skip
    rows = [{"model": c.model, "integer": len(c.integer), "float": len(c.float_), "cosine_sim": c.cosine_sim,
             "max_lsb_sim": c.max_lsb_sim, "lsb_bound": c.lsb_bound, "sqnr_fp_db": c.sqnr_fp_db, "ok": c.ok}
            for c in v.models]  # fmt: skip
    phase("verify", start, ok=v.ok, models=rows, end_to_end=v.end_to_end)
    result["peak_rss_gib_by_function"] = {k: v / 2**30 for k, v in sorted(sampler.peak.items(), key=lambda kv: -kv[1])}
    a.json.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
