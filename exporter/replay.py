"""Replay of calibration prompts at build time: the FP trajectories' denoiser inputs per step
(computed once), the FP outputs, the inputs of chosen linears at chosen steps, and the ranges of
the attention matmuls' operands and the linears' outputs under a plan. Used by ``--alpha auto`` (scores plans), the
percentile / MSE activation observers (samples) and ``--quantize-attention`` (ranges), ``--weight-rounding gptq``
(the inputs' Gram matrices), targets that close linears (output ranges) and integer-only targets (the
emitted graph's activation ranges, ``step_feeds`` and ``tensor_ranges``)."""

from __future__ import annotations

import copy
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import replace
from typing import Any

import numpy as np
import onnx
import torch
from qexport.exporter.attention import recording
from qexport.exporter.simulate import simulated
from qexport.passes.plan import RangePlan

from qexport.errors import QexportError
from qexport.models.adapter import ModelAdapter
from qexport.models.sampler import SamplingConfig, sample
from qexport.recipe import Scoring
from qexport.stages import stage

PROMPTS = 2  # calibration prompts replayed by default (each with its unconditional twin); --replay-prompts
MAX_ROWS = 65536  # samples kept per layer and range (evenly strided tokens beyond that)


def replay_count(asked: int | None, recorded: int, source: str) -> int:
    """How many calibration prompts a build replays: ``asked`` (the recipe's replay.prompts), else up to PROMPTS.

    Raises:
        QexportError: more prompts asked than the statistics record.
    """
    if asked is None:
        return min(PROMPTS, recorded)
    if asked > recorded:
        raise QexportError(
            f"recipe key 'replay.prompts' {asked} asks for more prompts than {source} records ({recorded}); "
            f"pass at most {recorded} or calibrate on more prompts"
        )
    return asked


@contextmanager
def cuda_matmuls(tf32: bool) -> Iterator[None]:
    """Within the block, CUDA matmuls and convolutions on the tensor cores in TF32 (tf32: a search's
    scoring forwards where the recipe's replay.scoring says so) or in full fp32; the CPU computes
    in fp32 either way."""
    flags = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = tf32
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = flags


def exact_fp32() -> AbstractContextManager[None]:
    """CUDA matmuls and convolutions in full fp32 (TF32 off), so that a GPU's FP passes and
    simulations match the CPU's to float rounding."""
    return cuda_matmuls(tf32=False)


def overlapped(device: str) -> bool:
    """Whether a build on `device` runs the replay's FP sampling loop beside its FP export (in
    another thread): where the replay has a transformer of its own (on_device), not on the CPU,
    whose replay runs the very module the export traces."""
    return torch.device(device).type != "cpu"


def on_device(adapter: ModelAdapter, device: str) -> ModelAdapter:
    """The adapter itself on the CPU or where its transformer already is (one on_device made);
    elsewhere the same adapter with a copy of its transformer moved to `device` (the build's FP
    graph holds views of the CPU transformer's weights, so that one stays where it is)."""
    kind = torch.device(device).type
    if kind == "cpu" or next(adapter.transformer.parameters()).device.type == kind:
        return adapter
    return replace(adapter, transformer=device_copy(adapter.transformer, torch.device(device)).eval())


def device_copy(module: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """A copy of the module with its parameters and buffers made on `device` one tensor at a time,
    never a second copy on the host (a deep copy then moved would hold the whole model twice there
    for a moment: 2.7 GB more at dit-xl-2). Tied parameters stay tied."""
    memo: dict[int, Any] = {}
    for p in module.parameters():
        memo.setdefault(id(p), torch.nn.Parameter(p.detach().to(device), requires_grad=p.requires_grad))
    for b in module.buffers():
        memo.setdefault(id(b), b.to(device))
    return copy.deepcopy(module, memo)


class CalibrationReplay:
    """FP denoiser inputs per step for the given calibration prompts (the build passes the first
    replay.prompts of them, PROMPTS by default), seed 0; torch runs on `device` (`build --device`),
    in full fp32 where that is a GPU (see exact_fp32); what it returns is numpy on the CPU."""

    def __init__(
        self,
        adapter: ModelAdapter,
        prompts: list[str],
        timesteps: list[int],
        cfg: float,
        device: str = "cpu",
        scoring: Scoring = Scoring.FP32,
    ) -> None:
        if not prompts:
            raise QexportError("this build option needs statistics that record their prompts; recalibrate")
        # Gram matrices being made ahead on a thread of their own (grams_ahead): their key and result
        self._ahead: tuple[tuple[tuple[int, ...], tuple[str, ...]], Future[dict[str, torch.Tensor]]] | None = None
        self._local = threading.local()  # .ahead: set on the thread that makes them
        with stage("FP replay"):  # the FP trajectories and outputs
            self.device = torch.device(device)
            self.scoring = scoring  # the precision of scored() on a GPU
            self._adapter = adapter = on_device(adapter, device)
            self._denoiser = adapter.denoiser()
            self.timesteps = timesteps
            cond = torch.cat([adapter.conditioner.encode(prompts), adapter.conditioner.null(len(prompts))])
            self.cond = cond.to(self.device)
            self.prompts = prompts
            self.cfg = cfg
            xs: list[torch.Tensor] = []
            ys: list[np.ndarray] = []
            width = self.denoiser.in_channels  # the denoiser's output: the prediction half of the transformer's

            def output(module: torch.nn.Module, args: Any, out: Any) -> None:
                ys.append(out[0][:, :width].detach().cpu().numpy().copy())

            transformer = adapter.transformer
            handles = [transformer.register_forward_pre_hook(lambda m, args: xs.append(args[0].detach().clone())),
                       transformer.register_forward_hook(output)]  # fmt: skip
            try:
                self.final = self.sample().cpu().numpy()  # FP final latents
            finally:
                for handle in handles:
                    handle.remove()
            if len(xs) != len(timesteps) or len(ys) != len(timesteps):
                raise QexportError(f"the replayed sampling loop called the transformer {len(xs)} times for "
                                   f"{len(timesteps)} steps; report this model")  # fmt: skip
            self.inputs = xs
            # the FP outputs, recorded by the loop (the same call as run(k) makes); kept now: a lazy
            # cache filled inside a simulation would hold quantized ones
            self.references = ys
            self._grams: dict[tuple[tuple[int, ...], tuple[str, ...]], dict[str, torch.Tensor]] = {}

    @property
    def adapter(self) -> ModelAdapter:
        """The replay's model; its transformer is free to use (Gram matrices made ahead are waited for)."""
        self._settle()
        return self._adapter

    @property
    def denoiser(self) -> Any:
        """The replay's denoiser (the transformer as the sampling loop calls it), free to use."""
        self._settle()
        return self._denoiser

    def _settle(self) -> None:
        """Wait for the Gram matrices being made ahead, if any (raising their error), and keep them as the
        last set; on the thread that makes them, nothing."""
        if self._ahead is None or getattr(self._local, "ahead", False):
            return
        key, future = self._ahead
        self._ahead = None
        with stage("FP replay"):  # the wait for what the device has not finished
            grams = future.result()
        self._grams.clear()
        self._grams[key] = grams

    def sample(self, on_step: Callable[[int, int], None] | None = None) -> torch.Tensor:
        """The whole sampling loop on the replayed prompts (seed 0), as the transformer computes."""
        cond = self.adapter.conditioner.encode(self.prompts)
        config = SamplingConfig(steps=len(self.timesteps), cfg=self.cfg)
        with exact_fp32():
            return sample(self.adapter, cond, [0] * len(self.prompts), config, on_step=on_step, device=self.device)

    def run(self, k: int, tf32: bool = False) -> np.ndarray:
        """The denoiser output at step k (as the transformer currently computes), in exact fp32, or
        with TF32 matmuls on a GPU (tf32)."""
        t = torch.full((len(self.cond),), self.timesteps[k], dtype=torch.long, device=self.device)
        with torch.no_grad(), cuda_matmuls(tf32):
            return self.denoiser(self.inputs[k], t, self.cond).cpu().numpy()

    def scored(self, k: int) -> np.ndarray:
        """run(k) in the recipe's scoring precision: a search candidate's output, compared with the
        exact FP reference (TF32 where replay.scoring is tf32 and the replay runs on a GPU)."""
        return self.run(k, tf32=self.scoring is Scoring.TF32)

    def reference(self, k: int) -> np.ndarray:
        """The FP denoiser output at step k."""
        return self.references[k]

    def layer_inputs(self, steps: list[int], layers: list[str]) -> dict[str, np.ndarray]:
        """Inputs [rows, features] of the named linears over the given steps, FP."""
        seen: dict[str, list[np.ndarray]] = {name: [] for name in layers}
        self._watch(steps, layers, lambda name, x: seen[name].append(x.cpu().numpy().copy()))
        out = {}
        for name, parts in seen.items():
            rows = np.concatenate(parts)
            stride = -(-len(rows) // MAX_ROWS)
            out[name] = rows[::stride]
        return out

    def input_grams(self, steps: list[int], layers: list[str]) -> dict[str, torch.Tensor]:
        """XᵀX [features, features] (float64) of the named linears' FP inputs X, every token row of
        the given steps, kept on the replay's device (a GPU build's H are made and kept there too:
        gptq.input_hessian); kept for the next call with the same
        (steps, layers), the last such set only: a range's searches and its plan ask for the same
        one, the next range for another (dit-xl-2's are 5.6 GB a range)."""
        self._settle()
        key = (tuple(steps), tuple(layers))
        if key not in self._grams:
            self._grams.clear()
            self._grams[key] = self._gram_set(steps, layers)
        return self._grams[key]

    def grams_ahead(self, steps: list[int], layers: list[str]) -> None:
        """Start making input_grams(steps, layers) on a thread of its own: a GPU build's next range's,
        while the CPU writes this range's model. Whatever next uses the transformer (input_grams,
        run, the adapter or denoiser) waits for them first; the last set made before is let go."""
        self._settle()
        key = (tuple(steps), tuple(layers))
        if key in self._grams:
            return
        self._grams.clear()

        # on a GPU, a stream of their own (after the work queued so far, which may still read the last
        # set): the CPU's reads of other device tensors meanwhile do not wait behind them
        stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None
        if stream is not None:
            stream.wait_stream(torch.cuda.current_stream(self.device))

        def made() -> dict[str, torch.Tensor]:
            self._local.ahead = True
            with nullcontext() if stream is None else torch.cuda.stream(stream):
                grams = self._gram_set(steps, layers)
            if stream is not None:
                stream.synchronize()  # done before any other stream uses them
            return grams

        pool = ThreadPoolExecutor(1, thread_name_prefix="grams")
        self._ahead = (key, pool.submit(made))
        pool.shutdown(wait=False)  # the thread ends with its one job

    def _gram_set(self, steps: list[int], layers: list[str]) -> dict[str, torch.Tensor]:
        grams: dict[str, torch.Tensor] = {}

        def add(name: str, x: torch.Tensor) -> None:
            gram = (x.T @ x).double()  # float32 products, summed over steps in float64
            grams[name] = gram if name not in grams else grams[name] + gram

        self._watch(steps, layers, add)
        return grams

    def _watch(self, steps: list[int], layers: list[str], take: Callable[[str, torch.Tensor], None]) -> None:
        """Run the given steps in FP (stage "FP replay"), handing each named linear's input [rows,
        features] to take."""
        modules = dict(self.adapter.transformer.named_modules())

        def grab(name: str) -> Any:
            def hook(module: torch.nn.Module, args: tuple[torch.Tensor, ...]) -> None:
                x = args[0].detach()
                take(name, x.reshape(-1, x.shape[-1]))

            return hook

        handles = [modules[name].register_forward_pre_hook(grab(name)) for name in layers]
        try:
            with stage("FP replay"):
                for k in steps:
                    self.run(k)
        finally:
            for h in handles:
                h.remove()

    def output_ranges(self, plan: RangePlan) -> dict[str, tuple[float, float]]:
        """(min, max) of each planned linear's MatMul result (its output less the bias, before any
        low-rank branch) over the plan's steps, the plan's linears simulated: what the output
        quantizer of a closed linear sees."""
        modules = dict(self.adapter.transformer.named_modules())
        seen: dict[str, tuple[float, float]] = {}

        def grab(name: str) -> Any:
            def hook(module: torch.nn.Module, args: tuple[torch.Tensor, ...], out: torch.Tensor) -> None:
                bias = getattr(module, "bias", None)
                y = (out if bias is None else out - bias).detach()
                lo, hi = seen.get(name, (np.inf, -np.inf))
                seen[name] = (min(lo, float(y.min())), max(hi, float(y.max())))

            return hook

        # registered before the simulation's own hooks, so they run first (before a low-rank branch)
        handles = [modules[name].register_forward_hook(grab(name)) for name in plan.layers]
        try:
            with stage("simulated ranges"), simulated(self.adapter.transformer, plan):
                for k in plan.steps:
                    self.run(k)
        finally:
            for h in handles:
                h.remove()
        return seen

    def attention_ranges(self, plan: RangePlan, modules: list[str]) -> dict[str, dict[str, tuple[float, float]]]:
        """(min, max) of each attention's matmul operands (query and key scaled by √(1/√d), probs,
        value) over the plan's steps, with the plan's linears simulated (folds, rotations,
        quantization): the tensors the emitted graph's attention matmuls read."""
        transformer = self.adapter.transformer
        with (
            stage("simulated ranges"),
            simulated(transformer, replace(plan, attention={})),
            recording(transformer, modules) as seen,
        ):
            for k in plan.steps:
                self.run(k)
        return {name: {op: (lo, hi) for op, (lo, hi) in ops.items()} for name, ops in seen.items()}

    def step_feeds(self, steps: list[int]) -> list[dict[str, np.ndarray]]:
        """The ONNX step model's inputs at the given steps, one feed per step and replayed prompt:
        its latents and conditioning with the unconditional twin (batch 2, conditional row first)
        and the timestep (a per-step model, whose timestep is fixed, ignores it)."""
        count = len(self.prompts)
        feeds = []
        for k in steps:
            for i in range(count):
                rows = [i, count + i]
                feeds.append({"latents": self.inputs[k][rows].cpu().numpy(), "cond": self.cond[rows].cpu().numpy(),
                              "timestep": np.full((2,), self.timesteps[k], dtype=np.int64)})  # fmt: skip
        return feeds


def tensor_ranges(
    model: onnx.ModelProto, feeds: list[dict[str, np.ndarray]], names: list[str]
) -> dict[str, tuple[float, float]]:
    """(min, max) of the named float tensors of `model` run on onnxruntime CPU over every feed (the
    observer of integer-only emission: the emitted graph's own activations)."""
    import onnxruntime as ort

    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    have = {o.name for o in probe.graph.output}
    probe.graph.output.extend(onnx.helper.make_tensor_value_info(n, onnx.TensorProto.FLOAT, None)
                              for n in names if n not in have)  # fmt: skip
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # the graph's own tensors
    session = ort.InferenceSession(probe.SerializeToString(), options, providers=["CPUExecutionProvider"])
    takes = {i.name for i in session.get_inputs()}
    seen: dict[str, tuple[float, float]] = {}
    for feed in feeds:
        for name, value in zip(names, session.run(names, {k: v for k, v in feed.items() if k in takes}), strict=True):
            lo, hi = seen.get(name, (np.inf, -np.inf))
            seen[name] = (min(lo, float(value.min())), max(hi, float(value.max())))
    return seen
