"""``calibrate``: run the FP sampling loop (the model's pipeline, ``QexportPipeline``) over prompts x
seeds with hooks on the chosen layers, optionally one shard of the work, or split across
torch.distributed ranks and reduced."""

from __future__ import annotations

import hashlib
import logging
import os
import time
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.distributed as dist
from qexport.calib.collect import Collector
from qexport.calib.distributed import reduce_layers
from qexport.calib.selection import LayerSelection, select_layers
from qexport.calib.stats import HIST_BINS, MOMENTUM
from qexport.calib.store import FORMAT, VERSION, QStats

from qexport import __version__
from qexport.errors import QexportError
from qexport.models.adapter import ModelAdapter
from qexport.models.sampler import SamplingConfig, autocast_dtype, sample
from qexport.progress import Progress, Units
from qexport.schema import plain_json

log = logging.getLogger(__name__)


@dataclass(frozen=True, kw_only=True)
class CalibConfig:
    """What to calibrate on: prompts x seeds, the sampling setup, batching and sharding."""

    prompts: tuple[str, ...]
    seeds: tuple[int, ...] = (0,)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    batch_size: int = 4
    selection: LayerSelection = field(default_factory=LayerSelection)
    histograms: bool = False
    shard: tuple[int, int] | None = None  # (index, count)
    device: str = "cpu"
    dtype: str = "auto"  # autocast: auto (fp16 on CUDA, fp32 elsewhere), fp32, fp16, bf16

    def __post_init__(self) -> None:
        if not self.prompts:
            raise QexportError("no calibration prompts given")
        if not self.seeds:
            raise QexportError("no seeds given")
        if self.batch_size < 1:
            raise QexportError(f"--batch-size must be >= 1, got {self.batch_size}")
        if self.shard is not None and not 0 <= self.shard[0] < self.shard[1]:
            raise QexportError(f"--shard must be i/n with 0 <= i < n, got {self.shard[0]}/{self.shard[1]}")
        autocast_dtype(self.dtype, self.device)  # refuses an unknown --dtype


@dataclass(frozen=True, kw_only=True)
class CalibResult:
    stats: QStats
    hooked: int
    excluded: list[str]
    batches: int
    seconds: float
    rank: int = 0
    finals: list[np.ndarray] = field(default_factory=list)  # pipeline calibration: each run's final latents


def _my_batches(n_batches: int, index: int, count: int) -> range:
    """Contiguous batches for shard/rank index of count (sampling order is kept when merged in order)."""
    return range(index * n_batches // count, (index + 1) * n_batches // count)


def _distributed() -> tuple[int, int, bool]:
    """(rank, world size, whether this call made the process group) under torchrun; (0, 1, False) else."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1, False
    created = not dist.is_initialized()
    if created:
        backend = "nccl" if torch.cuda.is_available() and os.environ.get("QEXPORT_BACKEND") != "gloo" else "gloo"
        if backend == "nccl":  # one GPU per rank, before NCCL picks one
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend)
    return dist.get_rank(), dist.get_world_size(), created


def calibrate(adapter: ModelAdapter, config: CalibConfig, progress: Progress | None = None) -> CalibResult:
    """Collect per-layer, per-step activation statistics from the FP sampling loop.

    Args:
        adapter: the model.
        config: prompts, seeds, sampling, batching, shard.
        progress: ticks of one task, a unit per (batch, step).

    Returns:
        The statistics (reduced over ranks under torchrun) and a summary.

    Raises:
        QexportError: bad prompts or patterns, before any sampling.
    """
    start = time.perf_counter()
    selected = select_layers(adapter.transformer, config.selection)
    cond_all = adapter.conditioner.encode(list(config.prompts))  # validates every prompt first
    pairs = [(i, s) for s in config.seeds for i in range(len(config.prompts))]
    batches = [pairs[i : i + config.batch_size] for i in range(0, len(pairs), config.batch_size)]
    rank, world, created = _distributed()
    index, count = config.shard if config.shard else (rank, world)
    mine = _my_batches(len(batches), index, count)
    device = torch.device(config.device)
    if device.type == "cuda" and world > 1:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    adapter.transformer.to(device)
    dtype = autocast_dtype(config.dtype, device)
    steps = config.sampling.steps
    collector = Collector(selected.layers, steps, config.histograms, device)
    units = Units(progress, "calibrating (steps x batches)", steps * len(mine))
    units.start(f"{len(mine)} batch(es) of up to {config.batch_size} prompt(s), {steps} steps")

    def on_step(i: int, samples: int) -> None:  # before each transformer call: the step from the scheduler
        collector.step = i
        collector.samples = samples  # cond + uncond halves
        if i > 0:
            units.done(f"step {i}/{steps}")

    try:
        for b in mine:
            batch = batches[b]
            cond = cond_all[[i for i, _ in batch]]
            sample(adapter, cond, [s for _, s in batch], config.sampling, on_step=on_step, device=device, dtype=dtype)
            units.done(f"step {steps}/{steps}")
    finally:
        layers = collector.close()
    if world > 1 and config.shard is None:
        layers = reduce_layers(layers, device)
    if created:  # the group this call made ends with it: no backend threads left for the interpreter's exit
        dist.destroy_process_group()
    samples = len(pairs) if world > 1 and config.shard is None else sum(len(batches[b]) for b in mine)
    header = _header(adapter, config, selected.layers, selected.excluded, samples)
    header["autocast"] = str(dtype).removeprefix("torch.") if dtype is not None else "float32"
    if config.shard is None and world > 1:
        header["shard"] = None
    stats = QStats(header=header, layers=layers)
    return CalibResult(
        stats=stats,
        hooked=len(selected.layers),
        excluded=selected.excluded,
        batches=len(mine),
        seconds=time.perf_counter() - start,
        rank=rank,
    )


def file_header(prompts: tuple[str, ...], layers: dict, excluded: list[str], histograms: bool) -> dict:
    """The header fields every .qstats file has, whichever loop sampled it."""
    return {
        "format": FORMAT,
        "version": VERSION,
        "tool_version": __version__,
        "prompts_hash": hashlib.sha256("\n".join(prompts).encode()).hexdigest()[:16],
        "prompts": len(prompts),
        "prompt_texts": list(prompts),
        "momentum": MOMENTUM,
        "histograms": histograms,
        "hist_bins": HIST_BINS if histograms else 0,
        "layers": {n: {"in_features": m.in_features, "out_features": m.out_features} for n, m in layers.items()},
        "excluded": excluded,
    }


def _header(adapter: ModelAdapter, config: CalibConfig, layers: dict, excluded: list[str], samples: int) -> dict:
    scheduler = adapter.make_scheduler()
    scheduler.set_timesteps(config.sampling.steps)
    return {
        **file_header(config.prompts, layers, excluded, config.histograms),
        "model_id": adapter.model_id,
        "class_name": adapter.class_name,
        "config_hash": adapter.config_hash(),
        "steps": config.sampling.steps,
        "timesteps": [int(t) for t in scheduler.timesteps],
        "scheduler": {"class": type(scheduler).__name__, "config": plain_json(dict(adapter.scheduler_config))},
        "cfg": config.sampling.cfg,
        "seeds": list(config.seeds),
        "batch_size": config.batch_size,
        "samples": samples,
        "shard": list(config.shard) if config.shard else None,
    }
