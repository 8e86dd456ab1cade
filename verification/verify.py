"""Verification of a build: onnx.checker; an onnxruntime CPU session with full optimisation whose
optimised graph proves which quantized layers run integer kernels; each model's output against
the torch simulation of the same plan and against FP, on inputs from the FP sampling trajectory;
and the whole sampling loop through the emitted models against FP from the same noise."""

from __future__ import annotations

import functools
import logging
import tempfile
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import torch
from qexport.exporter.replay import exact_fp32
from qexport.exporter.simulate import simulated
from qexport.passes.attention import AttentionPlan
from qexport.passes.plan import RangePlan
from qexport.targets.catalog import RUNTIMES
from qexport.targets.profile import TargetProfile
from qexport.verification.emitted import expand_kv, shared_input_layers
from qexport.verification.openvino_run import run_openvino
from qexport.verification.qnn_run import htp_session, run_htp

from qexport.errors import QexportError
from qexport.metrics import cosine, psnr_db, sqnr_db, ssim
from qexport.models.adapter import ModelAdapter
from qexport.models.sampler import SamplingConfig, sample
from qexport.progress import Progress, Units
from qexport.runtime.files import model_path
from qexport.runtime.kv import PromptFeeds, select
from qexport.runtime.loop import ModelOpener, Pipeline, session_options

log = logging.getLogger(__name__)

INTEGER_OPS = ("MatMulIntegerToFloat", "QLinearMatMul", "MatMulInteger", "QGemm", "DynamicQuantizeMatMul")
REENCODED = "_s8_2_u8"  # onnxruntime's suffix for an int8 tensor it re-encoded as uint8 (runtime.cpu)


def integer_inputs(optimized: onnx.ModelProto) -> set[str]:
    """The tensors an optimised graph's integer kernels read, by their emitted names (an int8 weight
    re-encoded as uint8 by onnxruntime's exact mode counts as itself)."""
    read = {i for n in optimized.graph.node if n.op_type in INTEGER_OPS for i in n.input}
    return read | {name.removesuffix(REENCODED) for name in read if name.endswith(REENCODED)}


# integer kernels that carry their operands' scales: (operand A, operand B, scale A, scale B) input slots
ATTENTION_SLOTS = {"MatMulIntegerToFloat": (0, 1, 2, 3), "QLinearMatMul": (0, 3, 1, 4), "QGemm": (0, 3, 1, 4)}
COSINE_FLOOR = 0.999  # ORT vs simulation, W8A8: the floor where the simulation itself is steady (see cosine_floor)
PERTURBATION = 1e-6  # relative input change that measures the quantized function's own sensitivity
# max |ORT - simulation|, in LSBs of an 8-bit grid over the output's range, may be at most
# LSB_FACTOR x the most the simulation itself moves when its input moves by PERTURBATION (perturbed),
# plus LSB_FLOOR: static quantization is discontinuous (an activation one ulp off a rounding
# boundary flips a code), and ORT's float op order differs from torch's by ulps.
LSB_FACTOR = 2.0
LSB_FLOOR = 2.0


@dataclass(kw_only=True)
class ModelCheck:
    model: str
    steps: list[int]
    integer: list[str] = field(default_factory=list)
    emulated: list[str] = field(default_factory=list)  # QDQ the runtime runs in float (not native here)
    float_: list[str] = field(default_factory=list)  # should be integer but is not: a failure
    # attention matmuls (--quantize-attention), "<module> QK^T" / "<module> PV", classified the same way
    attention_integer: list[str] = field(default_factory=list)
    attention_emulated: list[str] = field(default_factory=list)
    attention_float: list[str] = field(default_factory=list)
    cosine_sim: float = 0.0
    cosine_floor: float = COSINE_FLOOR  # from the simulation's own sensitivity where that is wider (cosine_floor)
    max_lsb_sim: float = 0.0
    lsb_bound: float = 0.0  # from the simulation's own sensitivity (see LSB_FACTOR)
    sqnr_fp_db: float = 0.0
    sqnr_sim_db: float = 0.0
    second: RuntimeCheck | None = None  # the same model on a second runtime (verify --runtime openvino)
    # False for an integer-only graph: the simulation models the linears' quantizers, not the 16-bit
    # requantization of every other activation, so the LSB difference is reported and the cosine judged
    lsb_judged: bool = True

    @property
    def ok(self) -> bool:
        integer = not self.float_ and not self.attention_float
        within = self.max_lsb_sim <= self.lsb_bound or not self.lsb_judged
        agrees = integer and self.cosine_sim >= self.cosine_floor and within
        return agrees and (self.second is None or self.second.ok(self.lsb_bound, self.cosine_floor))


@dataclass(kw_only=True)
class RuntimeCheck:
    """One model on a second runtime: its kernels, and its output against the simulation and onnxruntime."""

    runtime: str
    integer: int = 0
    emulated: int = 0
    float_: list[str] = field(default_factory=list)
    cosine_sim: float = 0.0
    max_lsb_sim: float = 0.0
    cosine_ort: float = 0.0
    max_lsb_ort: float = 0.0
    sqnr_ort_db: float = 0.0
    sqnr_fp_db: float = 0.0
    # False where the runtime computes what the simulation does not model (HTP: its FP16 float ops, or
    # an integer-only graph's 16-bit requantizations): its LSB difference is reported, its cosine judged
    lsb_judged: bool = True
    backend_ops: dict[str, int] = field(default_factory=dict)  # HTP: op type -> count in the compiled graph
    open_s: float = 0.0  # HTP: compiling the model for the backend
    run_s: float = 0.0

    def ok(self, bound: float, floor: float = COSINE_FLOOR) -> bool:
        """Integer kernels and agreement with the simulation, the one reference both runtimes are held
        to. The difference from onnxruntime is reported, not judged: two runtimes each within `bound` of
        the simulation may lie up to twice that apart, so a bound of its own would either repeat the
        simulation check or fail two correct runtimes whose rounding ties fall on opposite sides."""
        within = self.max_lsb_sim <= bound or not self.lsb_judged
        return not self.float_ and self.cosine_sim >= floor and within


@dataclass(kw_only=True)
class Verification:
    models: list[ModelCheck]
    end_to_end: dict[str, float]
    native: bool

    @property
    def ok(self) -> bool:
        return all(m.ok for m in self.models)

    def to_json(self) -> dict[str, Any]:
        rows = []
        for m in self.models:
            lists = ("integer", "emulated", "float_", "second", "attention_integer", "attention_emulated")
            row = {k: v for k, v in asdict(m).items() if k not in lists}
            row.update(integer=len(m.integer), emulated=len(m.emulated), float=m.float_, ok=m.ok)
            row.update(attention_integer=len(m.attention_integer), attention_emulated=len(m.attention_emulated))
            if m.second is not None:
                second = asdict(m.second)
                second["float"] = second.pop("float_")
                row["second"] = second
            rows.append(row)
        return {"ok": self.ok, "cosine_floor": COSINE_FLOOR, "lsb_factor": LSB_FACTOR, "models": rows,
                "end_to_end": self.end_to_end}  # fmt: skip


def expected_integer(
    path: Path, layers: list[str], ids: dict[str, str], runtime: TargetProfile, types: tuple[str, str]
) -> set[str]:
    """The layers `runtime` has an integer kernel for, given the storage types and the graph's shape."""
    if not runtime.runs_integer(*types):
        return set()
    if runtime.runs_integer(*types, shared_input=True):
        return set(layers)
    return set(layers) - shared_input_layers(path, layers, ids)


def expected_by_width(
    path: Path, layers: list[str], ids: dict[str, str], runtime: TargetProfile, plan: RangePlan, activation: str
) -> set[str]:
    """expected_integer, each layer by its own weight storage type (--mixed-precision mixes them); a
    run-time quantized input only where the runtime runs that granularity on an integer kernel."""
    found: set[str] = set()
    layers = [layer for layer in layers if plan.layers[layer].dynamic in (None, *runtime.native_dynamic)
              and not plan.layers[layer].coded]  # fmt: skip
    for storage in sorted({plan.layers[layer].w_grid.storage for layer in layers}):
        mine = [layer for layer in layers if plan.layers[layer].w_grid.storage == storage]
        if runtime.runs_integer(storage, activation, shared_input=True):
            found |= set(mine)
        elif runtime.runs_integer(storage, activation):
            found |= set(mine) - shared_input_layers(path, layers, ids)  # readers of all widths count
    return found


def optimized_session(path: Path, threads: int | None = None) -> tuple[ort.InferenceSession, onnx.ModelProto]:
    """An onnxruntime CPU session (full optimisation) and its optimised graph (initializers of 1 KiB
    and more not loaded)."""
    with tempfile.TemporaryDirectory() as tmp:
        opts = session_options(threads)
        opts.optimized_model_filepath = str(Path(tmp) / "optimized.onnx")
        opts.add_session_config_entry("session.optimized_model_external_initializers_file_name", "opt.bin")
        session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        optimized = onnx.load(opts.optimized_model_filepath, load_external_data=False)
    return session, optimized


def classify(
    names: list[str], reads: dict[str, list[str]], integer_reads: set[str], expected: set[str]
) -> tuple[list[str], list[str], list[str]]:
    """(integer, emulated, float): a name is integer when all its quantized tensors (`reads`) feed
    integer kernels; otherwise a failure where `expected` holds it, else emulated."""
    integer, emulated, floats = [], [], []
    for name in names:
        if all(t in integer_reads for t in reads[name]):
            integer.append(name)
        elif name in expected:
            floats.append(name)
        else:
            emulated.append(name)
    return integer, emulated, floats


def kernel_report(
    path: Path, layers: list[str], ids: dict[str, str], expected: set[str]
) -> tuple[ort.InferenceSession, list[str], list[str], list[str]]:
    """The session, and the (integer, emulated, float) layers read off its optimised graph: a
    layer not on an integer kernel is a failure where `expected` holds it, else emulated."""
    session, optimized = optimized_session(path)
    reads = {layer: [f"{ids[layer]}:w_q"] for layer in layers}
    return session, *classify(layers, reads, integer_inputs(optimized), expected)


def attention_kernels(
    optimized: onnx.ModelProto, attention: dict[str, AttentionPlan], expected: bool
) -> tuple[list[str], list[str], list[str]]:
    """(integer, emulated, float) attention matmuls ("<module> QK^T" / "<module> PV").

    An integer kernel of two activations (neither operand an initializer) is matched to a matmul by
    the values of its two operand scales: onnxruntime renames quantized tensors (int8 -> uint8
    conversion) and shares equal scalar initializers, so names do not survive, values do. Matmuls
    with equal scale pairs are interchangeable: each integer kernel accounts for one of them.
    """
    inits = {i.name: i for i in optimized.graph.initializer}
    kernels: Counter[tuple[float, float]] = Counter()
    for node in optimized.graph.node:
        slots = ATTENTION_SLOTS.get(node.op_type)
        if slots is None or any(node.input[i] in inits for i in slots[:2]):
            continue
        a, b = (inits.get(node.input[i]) for i in slots[2:])
        if a is not None and b is not None and not a.external_data and not b.external_data:
            kernels[(_scalar(a), _scalar(b))] += 1
    integer: list[str] = []
    emulated: list[str] = []
    floats: list[str] = []
    for module, ap in attention.items():
        for label, pair in ((f"{module} QK^T", (ap.query, ap.key)), (f"{module} PV", (ap.probs, ap.value))):
            key = (float(pair[0].scale), float(pair[1].scale))
            if kernels[key] > 0:
                kernels[key] -= 1
                integer.append(label)
            else:
                (floats if expected else emulated).append(label)
    return integer, emulated, floats


def _scalar(t: onnx.TensorProto) -> float:
    return float(onnx.numpy_helper.to_array(t).reshape(-1)[0])


@contextmanager
def torch_on(adapter: ModelAdapter, device: str) -> Iterator[torch.device]:
    """Run the transformer on `device` in full fp32 (TF32 off, so a GPU's simulation matches the
    CPU's), and move it back to the CPU afterwards."""
    where = torch.device(device)
    if where.type == "cuda" and not torch.cuda.is_available():
        raise QexportError(f"--device {device}: torch sees no CUDA device here; use --device cpu")
    adapter.transformer.to(where)
    try:
        with exact_fp32():
            yield where
    finally:
        adapter.transformer.to("cpu")


def trajectory(
    adapter: ModelAdapter, prompt: str, seed: int, config: SamplingConfig, device: str | torch.device = "cpu"
) -> list[np.ndarray]:
    """The FP sampler's latents at the start of every step (the inputs each step model sees)."""
    seen: list[np.ndarray] = []

    def grab(module: torch.nn.Module, args: tuple[torch.Tensor, ...]) -> None:
        seen.append(args[0][:1].detach().cpu().numpy().copy())  # the cond half; uncond is the same x

    handle = adapter.transformer.register_forward_pre_hook(grab)
    try:
        sample(adapter, adapter.conditioner.encode([prompt]), [seed], config, device=device)
    finally:
        handle.remove()
    return seen


def check_verify_request(manifest: dict[str, Any], runtime: str, only: list[int] | None) -> None:
    """What verify can refuse from a build's manifest alone, before any model is loaded: a runtime
    that is unknown, not for this build or not installed, and model indexes the build lacks.

    Raises:
        QexportError: naming the runtime (and how to install it) or the index and the build's range.
    """
    import importlib.util

    from qexport.targets.catalog import get_profile
    from qexport.verification.qnn_run import available

    if runtime not in (*RUNTIMES, "qnn-htp"):
        raise QexportError(f"unknown runtime {runtime!r}; choose one of {', '.join(RUNTIMES)}, qnn-htp")
    if "pipeline" in manifest and runtime != "onnxruntime":
        raise QexportError(f"a pipeline build is verified on onnxruntime; --runtime {runtime} is not supported for it")
    if runtime == "qnn-htp":
        get_profile(str(manifest["target"])).check_htp()
        if not available():
            raise QexportError("--runtime qnn-htp needs onnxruntime-qnn: pip install 'qexport[qnn]'")
    if runtime == "openvino" and importlib.util.find_spec("openvino") is None:
        raise QexportError("--runtime openvino needs OpenVINO: pip install 'qexport[openvino]'")
    count = len(manifest["ranges"])
    if bad := [i for i in only or [] if not 0 <= i < count]:
        raise QexportError(f"no model {bad[0]} in this build; it has models 0..{count - 1}")


def verify(
    folder: Path,
    adapter: ModelAdapter,
    plans: list[RangePlan],
    manifest: dict[str, Any],
    target: TargetProfile,
    prompt: str,
    seed: int = 0,
    only: list[int] | None = None,
    runtime: str = "onnxruntime",
    device: str = "cpu",
    threads: int | None = None,
    progress: Progress | None = None,
) -> Verification:
    """Verify the emitted models and the end-to-end loop (see module docstring).

    Args:
        target: the build's target (its storage types); which of them run as integer kernels is
            a property of the runtime (targets.catalog.RUNTIMES), not of the target.
        only: the ranges (indexes into the manifest's ranges, e.g. the first and last step of a
            full-size build) to verify; the end-to-end loop, which needs every model, is then not
            run and ``end_to_end`` is empty.
        runtime: "onnxruntime", or "openvino" to also run each model in OpenVINO's CPU runtime and
            compare it with onnxruntime and the simulation.
        device: where torch runs the FP trajectory and the simulation ("cuda" for full-size
            models, whose CPU simulation takes tens of minutes); the emitted models always run on
            the runtime's CPU provider.
        threads: onnxruntime intra-op threads (None: onnxruntime's default).
        progress: ticks of one task: the FP trajectory, each model, the end-to-end loop.

    Raises:
        QexportError: an index in only that the build does not have; an unknown runtime; a CUDA
            device that torch cannot see.
    """
    if runtime not in (*RUNTIMES, "qnn-htp"):
        raise QexportError(f"unknown runtime {runtime!r}; choose one of {', '.join(RUNTIMES)}, qnn-htp")
    if runtime == "qnn-htp":
        target.check_htp()
    chosen = range(len(plans)) if only is None else sorted(set(only))
    bad = [i for i in chosen if not 0 <= i < len(plans)]
    if bad:
        raise QexportError(f"no model {bad[0]} in this build; it has models 0..{len(plans) - 1}")
    q = manifest["quantization"]
    types = (target.weight_type(q["w_bits"]), target.activation_type(q["a_bits"]))
    widths = {lp.w_grid.storage for plan in plans for lp in plan.layers.values()}
    native = any(RUNTIMES["onnxruntime"].runs_integer(w, types[1]) for w in widths)
    config = SamplingConfig(steps=len(manifest["steps"]), cfg=manifest["cfg"])
    units = Units(progress, "verifying", 1 + len(chosen) + (only is None))
    run = _Run(folder=Path(folder), manifest=manifest, prompt=prompt, seed=seed, runtime=runtime, target=target,
               types=types, config=config, threads=threads, units=units)  # fmt: skip
    units.start("FP trajectory")
    with torch_on(adapter, device) as where:
        checks = _check_models(run, adapter, plans, chosen, where)
    e2e = {}
    if only is None:
        openers: dict[str, ModelOpener | None] = {"": None}  # onnxruntime CPU
        if runtime == "qnn-htp":  # and the same loop with every step model on the HTP backend
            openers["_htp"] = functools.partial(htp_session, target=target)
        e2e = end_to_end(run.folder, adapter, prompt, seed, config, threads, openers)
        units.done("end-to-end loop")
    return Verification(models=checks, end_to_end=e2e, native=native)


@dataclass(kw_only=True)
class _Run:
    """What every model check of one verify() call shares."""

    folder: Path
    manifest: dict[str, Any]
    prompt: str
    seed: int
    runtime: str
    target: TargetProfile
    types: tuple[str, str]
    config: SamplingConfig
    threads: int | None
    units: Units


def _check_models(
    run: _Run, adapter: ModelAdapter, plans: list[RangePlan], chosen: Any, where: torch.device
) -> list[ModelCheck]:
    """verify()'s per-model checks, with torch on `where`."""
    xs = trajectory(adapter, run.prompt, run.seed, run.config, where)
    run.units.done("FP trajectory")
    cond = torch.cat([adapter.conditioner.encode([run.prompt]), adapter.conditioner.null(1)])
    prompt_feeds = PromptFeeds(run.folder, run.manifest, session_options(run.threads)).feeds(cond.numpy())  # kv.onnx
    kv_layers = set((run.manifest.get("kv") or {}).get("layers", []))
    denoiser = adapter.denoiser().to(where)
    checks = []
    for index in chosen:
        check = _check_one(run, adapter, denoiser, plans[index], index, xs, cond, prompt_feeds, kv_layers, where)
        checks.append(check)
        run.units.done(check.model)
    if kv_layers:
        checks.append(check_kv(run.folder, adapter, plans[chosen[0]], run.manifest, cond, run.types))
    return checks


def _check_one(
    run: _Run, adapter: ModelAdapter, denoiser: Any, plan: RangePlan, index: int, xs: list[np.ndarray],
    cond: torch.Tensor, prompt_feeds: dict[str, np.ndarray], kv_layers: set[str], where: torch.device,
) -> ModelCheck:  # fmt: skip
    """One emitted model: checker, integer kernels, and its output vs FP and the simulation."""
    manifest, types, ids = run.manifest, run.types, run.manifest["layer_ids"]
    r = manifest["ranges"][index]
    path = model_path(run.folder, r["model"])
    onnx.checker.check_model(str(path))
    check = ModelCheck(model=r["model"], steps=r["steps"], lsb_judged=run.target.integer_activations is None)
    layers = [layer for layer in plan.layers if layer not in kv_layers]
    expected = expected_by_width(path, layers, ids, RUNTIMES["onnxruntime"], plan, types[1])
    session, optimized = optimized_session(path, run.threads)
    reads = {layer: [f"{ids[layer]}:w_q"] for layer in layers}
    check.integer, check.emulated, check.float_ = classify(layers, reads, integer_inputs(optimized), expected)
    native_attention = RUNTIMES["onnxruntime"].runs_attention_integer(types[1])
    check.attention_integer, check.attention_emulated, check.attention_float = attention_kernels(
        optimized, plan.attention, native_attention
    )
    step = r["steps"][0]
    x = torch.from_numpy(np.concatenate([xs[step], xs[step]]))
    tt = torch.full((2,), manifest["steps"][step]["timestep"], dtype=torch.long)
    feeds = {"latents": x.numpy(), **prompt_feeds}
    if "timestep" in {i["name"] for i in manifest["inputs"]}:
        feeds["timestep"] = tt.numpy()
    feeds = select(session, feeds)
    got = session.run(None, feeds)[0]
    x, tt, c = x.to(where), tt.to(where), cond.to(where)
    with torch.no_grad():
        fp = denoiser(x, tt, c).cpu().numpy()
        with simulated(adapter.transformer, plan):
            sim = denoiser(x, tt, c).cpu().numpy()
            moves = [denoiser(m, tt, c).cpu().numpy() for m in perturbed(x)]
            moved = max(moves, key=lambda m: float(np.abs(m - sim).max()))  # the widest of the three
    lsb = compare(check, fp, sim, moved, got)
    if run.runtime != "onnxruntime":
        check.second = _second(run, path, feeds, layers, plan, (fp, sim, got), lsb)
    return check


def _second(
    run: _Run, path: Path, feeds: dict[str, np.ndarray], layers: list[str], plan: RangePlan,
    outputs: tuple[np.ndarray, np.ndarray, np.ndarray], lsb: float,
) -> RuntimeCheck:  # fmt: skip
    """The model on the second runtime: OpenVINO's CPU plugin, or Qualcomm's HTP backend (fallback
    off; its kernels read off the graph it compiled), against the simulation, onnxruntime and FP."""
    fp, sim, got = outputs
    ids = run.manifest["layer_ids"]
    timing: dict[str, Any] = {}
    if run.runtime == "qnn-htp":
        htp = run_htp(path, feeds, layers, ids, run.target)
        output, integer, emulated, float_ = htp.output, len(htp.integer), 0, htp.float_
        timing = {"backend_ops": htp.ops, "open_s": round(htp.open_seconds, 2), "run_s": round(htp.run_seconds, 2)}
    else:
        expected = expected_by_width(path, layers, ids, RUNTIMES[run.runtime], plan, run.types[1])
        ov = run_openvino(path, feeds, layers, ids, expected)
        output, integer, emulated, float_ = ov.output, len(ov.integer), len(ov.emulated), ov.float_
    return RuntimeCheck(runtime=run.runtime, integer=integer, emulated=emulated, float_=float_,
                        cosine_sim=cosine(sim, output), max_lsb_sim=float(np.abs(sim - output).max() / lsb),
                        cosine_ort=cosine(got, output), max_lsb_ort=float(np.abs(got - output).max() / lsb),
                        sqnr_ort_db=sqnr_db(got, output), sqnr_fp_db=sqnr_db(fp, output),
                        lsb_judged=run.runtime != "qnn-htp", **timing)  # fmt: skip


def check_kv(
    folder: Path, adapter: ModelAdapter, plan: RangePlan, manifest: dict[str, Any], cond: torch.Tensor,
    types: tuple[str, str],
) -> ModelCheck:  # fmt: skip
    """kv.onnx (--precompute-kv): onnx.checker, integer kernels for its quantized linears, and all
    its K/V outputs together against the torch simulation and FP, in the layout the step models use
    (replicated by the first step model's own nodes)."""
    spec, ids = manifest["kv"], manifest["layer_ids"]
    path = model_path(folder, spec["model"])
    onnx.checker.check_model(str(path))
    layers = list(spec["layers"])
    check = ModelCheck(model=spec["model"], steps=[s["index"] for s in manifest["steps"]])
    expected = expected_integer(path, layers, ids, RUNTIMES["onnxruntime"], types)
    session, check.integer, check.emulated, check.float_ = kernel_report(path, layers, ids, expected)
    names = [o.name for o in session.get_outputs()]
    outputs = dict(zip(names, session.run(None, {"cond": cond.numpy()}), strict=True))
    full = expand_kv(model_path(folder, manifest["ranges"][0]["model"]), outputs, ids)
    got = np.concatenate([full[layer].ravel() for layer in layers])
    fp, sim, moved = (np.concatenate([v.ravel() for v in kv]) for kv in kv_reference(adapter, plan, cond, layers))
    compare(check, fp, sim, moved, got)
    return check


def perturbed(x: torch.Tensor) -> list[torch.Tensor]:
    """x moved by PERTURBATION three ways: up, down, and up or down by a fixed random sign per
    element. One direction alone underestimates how far rounding flips carry (measured: 6.3-10.5
    LSB over the three at tiny-latte's last demo step, where the runtimes' float kernels differ)."""
    signs = np.random.default_rng(0).choice(np.array([-1.0, 1.0], np.float32), size=tuple(x.shape))
    mixed = 1 + PERTURBATION * torch.from_numpy(signs).to(x.device)
    return [x * (1 + PERTURBATION), x * (1 - PERTURBATION), x * mixed]


def cosine_floor(sim: np.ndarray, moved: np.ndarray) -> float:
    """The cosine a runtime must reach against the simulation: COSINE_FLOOR, or lower where the
    simulation itself moves further when its input moves by PERTURBATION. Each quantizer turns an
    input change far below its step into a few flipped codes of a whole step each, so a change
    grows through the quantizers in series until it is as large as the quantization error itself
    (measured: tiny-latte's W8A8 build with requantized linear outputs, last step: cos 0.9982-0.9987
    between the simulation and itself moved by 1e-6). A runtime whose float op order differs by
    ulps draws other flips in the same way, so it is held to LSB_FACTOR x that move in amplitude:
    1 - cos grows as its square."""
    spread = 1.0 - cosine(sim, moved)
    return min(COSINE_FLOOR, 1.0 - LSB_FACTOR**2 * spread)


def compare(check: ModelCheck, fp: np.ndarray, sim: np.ndarray, moved: np.ndarray, got: np.ndarray) -> float:
    """Fill check's numbers: the runtime's output `got` vs the simulation `sim` (cosine, judged
    against cosine_floor; max error in LSBs of sim's range on an 8-bit grid, bounded by how far sim
    moves when its input moves by PERTURBATION) and vs FP (SQNR); returns the LSB."""
    lsb = max(float(sim.max() - sim.min()) / 255.0, 1e-12)
    check.cosine_sim = cosine(sim, got)
    check.cosine_floor = cosine_floor(sim, moved)
    check.max_lsb_sim = float(np.abs(sim - got).max() / lsb)
    check.lsb_bound = LSB_FACTOR * float(np.abs(sim - moved).max() / lsb) + LSB_FLOOR
    check.sqnr_fp_db = sqnr_db(fp, got)
    check.sqnr_sim_db = sqnr_db(sim, got)
    return lsb


def kv_reference(
    adapter: ModelAdapter, plan: RangePlan, cond: torch.Tensor, layers: list[str]
) -> tuple[list[np.ndarray], list[np.ndarray], list[np.ndarray]]:
    """The named linears' outputs in torch: FP, simulated, and simulated with cond scaled by
    (1 + PERTURBATION) (their inputs depend on cond alone, so any latents and timestep do)."""
    modules = dict(adapter.transformer.named_modules())
    where = next(adapter.transformer.parameters()).device
    x, t, _ = (v.to(where) for v in adapter.example_inputs(batch=len(cond)))
    cond = cond.to(where)
    denoiser = adapter.denoiser().to(where)

    def capture(c: torch.Tensor) -> list[np.ndarray]:
        seen: dict[str, np.ndarray] = {}

        def grab(name: str) -> Any:
            def hook(module: torch.nn.Module, args: Any, out: torch.Tensor) -> None:
                seen[name] = out.detach().cpu().numpy().copy()

            return hook

        hooks = [modules[n].register_forward_hook(grab(n)) for n in layers]
        try:
            with torch.no_grad():
                denoiser(x, t, c)
        finally:
            for h in hooks:
                h.remove()
        return [seen[n] for n in layers]

    fp = capture(cond)
    with simulated(adapter.transformer, plan):
        return fp, capture(cond), capture(cond * (1 + PERTURBATION))


def end_to_end(
    folder: Path, adapter: ModelAdapter, prompt: str, seed: int, config: SamplingConfig, threads: int | None = None,
    openers: dict[str, ModelOpener | None] | None = None,
) -> dict[str, float]:  # fmt: skip
    """The sampling loop through the emitted models vs the FP loop (sampled once), from the same
    noise: one loop per entry of `openers` (suffix -> how it opens the step models; None: onnxruntime's
    CPU provider), each loop's figures under keys ending in its suffix. Default: one CPU loop, no suffix."""
    cond = adapter.conditioner.encode([prompt])
    fp = adapter.decode(sample(adapter, cond, [seed], config))
    figures: dict[str, float] = {}
    for suffix, opener in (openers or {"": None}).items():
        loop = Pipeline(folder, threads=threads, open_model=opener)
        result = loop.run(cond.numpy(), adapter.conditioner.null(1).numpy(), seed)
        q = adapter.decode(torch.from_numpy(result.latents))
        figures.update({f"psnr_db{suffix}": psnr_db(fp, q), f"ssim{suffix}": ssim(fp, q),
                        f"step_ms{suffix}": 1e3 * float(np.mean(result.step_seconds))})  # fmt: skip
    return figures
