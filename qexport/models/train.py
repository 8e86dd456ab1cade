"""Train a built-in model on moving-shapes data and write it as a diffusers-format folder.

    python -m qexport.models.train --model tiny-latte --out DIR --device cuda --minutes 7
    python -m qexport.models.train --model tiny-dit --out DIR --smoke      # a few CPU steps

Records config, seed, steps and final loss in DIR/training.json next to the weights.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from diffusers import DDIMScheduler
from torch import nn

from qexport import __version__
from qexport.models import architectures, shapes
from qexport.models.adapter import SCHEDULER_CONFIG, Denoiser
from qexport.models.text_encoder import CaptionEncoder, CaptionEncoderConfig
from qexport.models.trust import refuse_pickled
from qexport.tokenizer import tokenize

log = logging.getLogger("qexport.train")

CLASS_NAMES = {"tiny-latte": "LatteTransformer3DModel", "tiny-dit": "DiTTransformer2DModel"}
CONFIGS = {"tiny-latte": architectures.TINY_LATTE, "tiny-dit": architectures.TINY_DIT}
DESCRIPTIONS = {
    "tiny-latte": "text-to-video Latte (spatial+temporal blocks, cross-attention, adaLN-single), 16x32x32 RGB",
    "tiny-dit": "class-conditional image DiT (adaLN-Zero), 32x32 RGB, 18 classes = colour x shape",
}


@dataclass(frozen=True, kw_only=True)
class TrainConfig:
    model: str
    out: str
    device: str = "cpu"
    clips: int = 20000
    batch_size: int = 128
    lr: float = 5e-4
    warmup: int = 300
    max_steps: int = 20000
    minutes: float = 7.0
    ema: float = 0.999
    null_prob: float = 0.1
    seed: int = 0
    init: str | None = None  # continue from a folder written by this script
    compile: bool = False  # torch.compile the denoiser (falls back to eager if it fails)


def _data(cfg: TrainConfig) -> tuple[torch.Tensor, torch.Tensor]:
    video = cfg.model == "tiny-latte"
    clips, specs = shapes.make_dataset(cfg.clips, seed=cfg.seed, moving=video)
    x = torch.from_numpy(clips)  # uint8 [N, F, H, W, 3]
    if video:
        x = x.permute(0, 4, 1, 2, 3)  # [N, C, F, H, W]
        cond = torch.from_numpy(tokenize([s.caption for s in specs]))
    else:
        x = x[:, 0].permute(0, 3, 1, 2)  # [N, C, H, W]
        names = shapes.class_names()
        cond = torch.tensor([names.index(shapes.label_of(s.colour, s.shape)) for s in specs])
    return x.contiguous(), cond


def _lr_at(step: int, cfg: TrainConfig) -> float:
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    frac = (step - cfg.warmup) / max(1, cfg.max_steps - cfg.warmup)
    return cfg.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(frac, 1.0))))


def _zero_init(transformer: nn.Module) -> None:
    """DiT-style start: the output projection and the adaLN-Zero modulation begin at zero."""
    for name, module in transformer.named_modules():
        zero = name in ("proj_out", "proj_out_2") or (name.endswith("norm1.linear") and isinstance(module, nn.Linear))
        if zero and isinstance(module, nn.Linear):
            nn.init.zeros_(module.weight)
            if module.bias is not None:
                nn.init.zeros_(module.bias)


def train(cfg: TrainConfig) -> dict[str, Any]:
    """Train and save; returns the training record written to training.json."""
    torch.manual_seed(cfg.seed)
    device = torch.device(cfg.device)
    class_name = CLASS_NAMES[cfg.model]
    history: list[dict[str, Any]] = []
    if cfg.init:
        init = Path(cfg.init)
        refuse_pickled(init / "transformer")
        transformer = architectures.model_class(class_name).from_pretrained(
            str(init / "transformer"), torch_dtype=torch.float32, use_safetensors=True
        )
        previous = json.loads((init / "training.json").read_text())
        history = [*previous.pop("history", []), previous]
    else:
        transformer = architectures.build(class_name, CONFIGS[cfg.model])
        _zero_init(transformer)
    transformer = transformer.to(device).train()
    modules: dict[str, nn.Module] = {"transformer": transformer}
    if cfg.model == "tiny-latte":
        encoder = (
            CaptionEncoder.load(Path(cfg.init) / "text_encoder") if cfg.init else CaptionEncoder(CaptionEncoderConfig())
        )
        modules["text_encoder"] = encoder.to(device).train()
    ema = {k: copy.deepcopy(m).eval().requires_grad_(False) for k, m in modules.items()}
    params = [p for m in modules.values() for p in m.parameters()]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0)
    x_all, cond_all = _data(cfg)
    x_all, cond_all = x_all.to(device), cond_all.to(device)
    alphas = torch.as_tensor(DDIMScheduler(**SCHEDULER_CONFIG).alphas_cumprod, dtype=torch.float32, device=device)
    denoiser = Denoiser(transformer, class_name, 3)
    autocast = (
        torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else torch.autocast("cpu", enabled=False)
    )
    losses: list[float] = []
    pending: list[torch.Tensor] = []
    skipped = 0
    forward: Any = denoiser
    if cfg.compile:
        try:
            forward = torch.compile(denoiser)
        except Exception as exc:  # compile support differs per platform; eager is always correct
            log.warning("torch.compile unavailable (%s); training eagerly", exc)
    start, step = time.time(), 0
    while step < cfg.max_steps and time.time() - start < cfg.minutes * 60:
        idx = torch.randint(len(x_all), (cfg.batch_size,), device=device)
        x0 = x_all[idx].float() / 127.5 - 1.0
        t = torch.randint(0, len(alphas), (cfg.batch_size,), device=device)
        noise = torch.randn_like(x0)
        ab = alphas[t].view(-1, *([1] * (x0.ndim - 1)))
        xt = ab.sqrt() * x0 + (1 - ab).sqrt() * noise
        cond = cond_all[idx]
        with autocast:
            if "text_encoder" in modules:
                drop = torch.rand(cfg.batch_size, device=device) < cfg.null_prob
                cond = modules["text_encoder"](torch.where(drop[:, None], 0, cond))  # all <pad> = null caption
            target = ab.sqrt() * noise - (1 - ab).sqrt() * x0  # v-prediction
            loss = nn.functional.mse_loss(forward(xt, t, cond).float(), target)
        for group in opt.param_groups:
            group["lr"] = _lr_at(step, cfg)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        norm = nn.utils.clip_grad_norm_(params, 1.0)
        if not (torch.isfinite(loss) and torch.isfinite(norm)):  # a bf16 overflow: skip, keep the weights clean
            skipped += 1
            opt.zero_grad(set_to_none=True)
            step += 1
            continue
        opt.step()
        decay = 0.0 if step < cfg.warmup else cfg.ema
        with torch.no_grad():
            for k, m in modules.items():
                for pe, pm in zip(ema[k].parameters(), m.parameters(), strict=True):
                    pe.lerp_(pm, 1 - decay)
        pending.append(loss.detach())
        step += 1
        if step % 100 == 0:
            losses.extend(torch.stack(pending).tolist())
            pending.clear()
        if step % 500 == 0:
            log.info("step %d loss %.4f (%.0fs)", step, np.mean(losses[-500:]), time.time() - start)
    losses.extend(torch.stack(pending).tolist() if pending else [])
    record = {
        "model": cfg.model,
        "class_name": class_name,
        "train_config": asdict(cfg),
        "transformer_config": CONFIGS[cfg.model],
        "steps": step,
        "skipped_nonfinite_steps": skipped,
        "total_steps": step + sum(int(h["steps"]) for h in history),
        "history": history,
        "final_loss": float(np.mean(losses[-100:])) if losses else None,
        "seconds": round(time.time() - start, 1),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "qexport": __version__,
    }
    _save(Path(cfg.out), cfg.model, {k: m.cpu() for k, m in ema.items()}, record)
    return record


def _save(folder: Path, name: str, modules: dict[str, nn.Module], record: dict[str, Any]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    transformer: Any = copy.deepcopy(modules["transformer"]).to(torch.float16)
    transformer.save_pretrained(str(folder / "transformer"), safe_serialization=True)
    if "text_encoder" in modules:
        encoder = modules["text_encoder"]
        assert isinstance(encoder, CaptionEncoder)
        encoder.save(folder / "text_encoder")
    DDIMScheduler(**SCHEDULER_CONFIG).save_pretrained(str(folder / "scheduler"))
    meta: dict[str, Any] = {
        "pixel_latents": True,
        "description": DESCRIPTIONS[name],
        "parameters": sum(p.numel() for m in modules.values() for p in m.parameters()),
    }
    if name == "tiny-dit":
        meta["class_names"] = shapes.class_names()
    index = {
        "_class_name": "QexportLabelPipeline" if name == "tiny-dit" else "QexportPipeline",
        "transformer": ["diffusers", record["class_name"]],
        "scheduler": ["diffusers", "DDIMScheduler"],
        "qexport": meta,
    }
    if "text_encoder" in modules:
        index["text_encoder"] = ["qexport", "CaptionEncoder"]
    (folder / "model_index.json").write_text(json.dumps(index, indent=2))
    (folder / "training.json").write_text(json.dumps(record, indent=2))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=sorted(CLASS_NAMES), required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--minutes", type=float, default=7.0)
    parser.add_argument("--max-steps", type=int, default=20000)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--clips", type=int, default=20000)
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--init", help="continue training from this model folder")
    parser.add_argument("--warmup", type=int, default=300)
    parser.add_argument("--compile", action="store_true", help="torch.compile the denoiser")
    parser.add_argument("--smoke", action="store_true", help="a few steps on a few clips (CPU test of the script)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    if args.smoke:
        args.max_steps, args.batch_size, args.clips, args.minutes = 3, 2, 8, 5.0
    cfg = TrainConfig(
        model=args.model,
        out=args.out,
        device=args.device,
        clips=args.clips,
        batch_size=args.batch_size,
        lr=args.lr,
        max_steps=args.max_steps,
        minutes=args.minutes,
        seed=args.seed,
        init=args.init,
        compile=args.compile,
        warmup=min(args.warmup, max(1, args.max_steps // 10)),
    )
    record = train(cfg)
    log.info(
        "trained %s: %d steps, final loss %s, %.0fs",
        cfg.model,
        record["steps"],
        record["final_loss"],
        record["seconds"],
    )


if __name__ == "__main__":
    main()
