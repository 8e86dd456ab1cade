"""Judge a model's own FP samples on the fixed evaluation set (the figures in docs/models.md)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from qexport.models import shapes
from qexport.models.adapter import ModelAdapter
from qexport.models.judge import JudgeReport, score
from qexport.models.sampler import SamplingConfig, generate


@dataclass(frozen=True, kw_only=True)
class FPEvalResult:
    model_id: str
    prompts: list[str]
    seeds: list[int]
    report: JudgeReport


def default_prompts(adapter: ModelAdapter, full: bool = False) -> list[str]:
    """Captions (video) or class labels (image) of the evaluation set; full = every combination."""
    if adapter.conditioner.kind == "label":
        names = getattr(adapter.conditioner, "names", None)
        if names == []:  # a full-size class-conditional config: no class names, labels by index
            return [str(i) for i in range(min(8, int(getattr(adapter.conditioner, "num_classes", 8))))]
        return shapes.class_names()
    if full:
        return [shapes.caption_of(*c) for c in shapes.all_combinations()]
    return shapes.eval_prompts()


def evaluate_fp(
    adapter: ModelAdapter,
    prompts: list[str],
    seeds: list[int],
    config: SamplingConfig,
    batch_size: int = 8,
    progress: Callable[[int], None] | None = None,
    device: str | torch.device = "cpu",
) -> FPEvalResult:
    """Sample every (prompt, seed) pair with the FP model and judge the outputs."""
    pairs = [(p, s) for s in seeds for p in prompts]
    outputs = generate(
        adapter, [p for p, _ in pairs], [s for _, s in pairs], config, batch_size, progress=progress, device=device
    )
    return FPEvalResult(
        model_id=adapter.model_id, prompts=prompts, seeds=seeds, report=score(outputs, [p for p, _ in pairs])
    )


def main(argv: list[str] | None = None) -> None:
    """``python -m qexport.models.fp_eval --model tiny-latte [--folder DIR] [--device cuda]``."""
    import argparse
    import json
    import logging
    from pathlib import Path

    from qexport.models.registry import load_folder, load_model

    parser = argparse.ArgumentParser(description="judge FP samples of a model on the evaluation set")
    parser.add_argument("--model", required=True)
    parser.add_argument("--folder", help="load the model from this folder instead of the package")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--seeds", default="0")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--cfg", type=float, default=7.0)
    parser.add_argument("--full", action="store_true", help="every colour x shape x direction, not the 24-prompt set")
    parser.add_argument("--batch-size", type=int, default=8)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    adapter = load_folder(Path(args.folder), model_id=args.model) if args.folder else load_model(args.model)
    seeds = [int(s) for s in args.seeds.split(",")]
    result = evaluate_fp(
        adapter,
        default_prompts(adapter, full=args.full),
        seeds,
        SamplingConfig(steps=args.steps, cfg=args.cfg),
        batch_size=args.batch_size,
        device=args.device,
    )
    r = result.report
    print(
        json.dumps(
            {
                "model": args.model,
                "samples": r.count,
                "accuracy": r.accuracy,
                "adherence": r.adherence,
                "temporal_consistency": r.temporal_consistency,
                "steps": args.steps,
                "cfg": args.cfg,
                "seeds": seeds,
                "full": args.full,
            }
        )
    )


if __name__ == "__main__":
    main()
