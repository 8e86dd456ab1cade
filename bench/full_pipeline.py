"""A whole diffusers pipeline at full size, random weights: the folder (transformer, text encoder,
VAE, scheduler, a generated tokenizer) saved by the pipeline's own save_pretrained, calibrated
through its own __call__, built as per-step W8A8 models with its text encoder and VAE as edge parts
(W8A8 ASQ + TSW: one weight set stored once for all steps), and a subset of the step models verified. Time, peak host
memory (RSS) and disk of each phase go to one JSON file.

    python bench/full_pipeline.py --config pixart-alpha-512 --root /tmp/full --device cuda --json full.json

Configs: ``pixart-alpha-512`` (PixArt-α 512 px, a T5-XXL-sized encoder, SD's VAE) and
``wan2.1-1.3b`` (Wan2.1-T2V-1.3B, a UMT5-XXL-sized encoder, Wan's 3-D VAE; 480x832, 17 frames).
``--config tiny-pixart`` runs the same phases on the tests' tiny PixArt-α folder (a CPU rehearsal).
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
WAN_VAE: dict[str, Any] = {}  # AutoencoderKLWan's defaults: the checkpoint's config
SD_VAE = {"block_out_channels": (128, 256, 512, 512), "layers_per_block": 2, "latent_channels": 4,
          "norm_num_groups": 32, "sample_size": 512, "scaling_factor": 0.18215,
          "down_block_types": ("DownEncoderBlock2D",) * 4, "up_block_types": ("UpDecoderBlock2D",) * 4}  # fmt: skip


def _peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _disk(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def _test_pipelines() -> Any:
    """tests/pipelines.py: the generated tokenizers and the tiny folders the test suite uses."""
    path = Path(__file__).resolve().parent.parent / "tests" / "pipelines.py"
    spec = importlib.util.spec_from_file_location("qexport_test_pipelines", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def make_folder(config: str, root: Path, device: str) -> Path:
    """The pipeline folder of a named config, random weights (seed 0), initialised on `device`."""
    import diffusers
    from transformers import T5Config, T5EncoderModel

    from qexport.models.architectures import FULL_SIZE

    tests = _test_pipelines()
    if config == "tiny-pixart":
        return Path(tests.FAMILIES["pixart-alpha"](root))
    tokenizer = tests.t5_tokenizer(max_length=512)
    torch.manual_seed(0)
    if config == "wan2.1-1.3b":  # Wan2.1-T2V-1.3B: its transformer, UMT5-XXL, the 3-D causal VAE
        from transformers import UMT5Config, UMT5EncoderModel

        with torch.device(device):
            transformer = diffusers.WanTransformer3DModel(**WAN_1_3B)
            encoder = UMT5EncoderModel(UMT5Config(**{**tests._t5_config(tokenizer), **UMT5_XXL}))
            vae = diffusers.AutoencoderKLWan(**WAN_VAE)
        scheduler = diffusers.UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True,
                                                      flow_shift=3.0, num_train_timesteps=1000)  # fmt: skip
        wan = diffusers.WanPipeline(tokenizer=tokenizer, text_encoder=encoder.eval(), vae=vae.eval(),
                                    transformer=transformer.eval(), scheduler=scheduler)  # fmt: skip
        wan.to("cpu", torch.float16).save_pretrained(root / config)
        return root / config
    class_name, transformer_config, _ = FULL_SIZE[config]
    with torch.device(device):
        transformer = getattr(diffusers, class_name)(**transformer_config)
        encoder = T5EncoderModel(T5Config(**{**tests._t5_config(tokenizer), **T5_XXL, "vocab_size": 32128}))
        vae = diffusers.AutoencoderKL(in_channels=3, out_channels=3, **SD_VAE)
    parts = {"tokenizer": tokenizer, "text_encoder": encoder.eval(), "vae": vae.eval()}
    pipe = diffusers.PixArtAlphaPipeline(**parts, transformer=transformer.eval(), scheduler=tests._pixart_scheduler())
    folder = root / config
    pipe.to("cpu", torch.float16).save_pretrained(folder)  # fp16 on disk; loaded back in fp32
    return folder


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", choices=sorted(CALLS), required=True)
    parser.add_argument("--root", type=Path, required=True, help="a folder for the pipeline and the build")
    parser.add_argument("--device", default="cpu", help="where torch runs (cuda at full size)")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--verify", default="0,-1", help="step models to verify (-1: the last)")
    parser.add_argument("--json", type=Path, required=True)
    parser.add_argument("--stack-every", type=float, default=0, help="dump the Python stack every N s (0: never)")
    a = parser.parse_args()
    if a.stack_every:
        faulthandler.dump_traceback_later(a.stack_every, repeat=True)

    from qexport.calib.pipeline import PipelineCalibConfig, calibrate_pipeline
    from qexport.calib.store import save
    from qexport.exporter.built import BuildConfig
    from qexport.exporter.pipeline_build import build_pipeline
    from qexport.targets.catalog import get_profile
    from qexport.verification.pipeline_verify import DEFAULT_PROMPT, verify_pipeline

    from qexport.recipe import load_recipe, with_settings

    result: dict[str, Any] = {"config": a.config, "device": a.device, "steps": a.steps, "random_init": True}

    def phase(name: str, start: float, **extra: Any) -> None:
        result[name] = {"seconds": round(time.perf_counter() - start, 1), "peak_rss_gib": _peak_rss() / 2**30, **extra}
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

    start = time.perf_counter()
    recipe = with_settings(load_recipe("w8a8-tsq-tsw"), ["smoothquant.mode=asq"])  # one weight set for all steps
    built = build_pipeline(stats, a.root / "build", BuildConfig(recipe=recipe), device=a.device)
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


if __name__ == "__main__":
    main()
