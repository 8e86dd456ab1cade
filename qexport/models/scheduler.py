"""A diffusers scheduler as plain numbers for the edge: every supported scheduler's step is linear
in the samples it was given, the model outputs it was given and (stochastic ones) fresh noise,

    x[i+1] = sum_j a[i][j] * x[j] + sum_j b[i][j] * out[j] + c[i] * noise[i],

with the model fed scale[i] * x[i] at timestep t[i] and x[0] = init_noise_sigma * noise. The
coefficients are read off the folder's own scheduler instance (its class and config, the
set_timesteps arguments the pipeline used) by stepping it on independent unit lanes: one lane per
sample and per model output, all in one tensor, so the scheduler's history (multistep solvers) is
followed exactly. ``check`` then runs the scheduler itself on random inputs and demands the same
trajectory within CHECK_RTOL per step; what is not linear is refused by name."""

from __future__ import annotations

import copy
from typing import Any

import numpy as np
import torch

from qexport.errors import QexportError

# the classes whose linearity the test suite checks step by step (tests/test_scheduler.py)
SUPPORTED = (
    "DDIMScheduler",
    "DDPMScheduler",
    "EulerDiscreteScheduler",
    "FlowMatchEulerDiscreteScheduler",
    "DPMSolverMultistepScheduler",
    "UniPCMultistepScheduler",
    "CogVideoXDDIMScheduler",
)
NONLINEAR_KEYS = ("clip_sample", "thresholding")  # config switches that clamp inside step()
CHECK_RTOL = 1e-6  # the probed update against scheduler.step, relative to the sample's norm
NOISE_SEED = 1234  # the probe's per-step noise generator seed (any fixed value)


def _ready(scheduler: Any, steps: int, set_timesteps: dict[str, Any] | None) -> Any:
    """A copy of the scheduler set up as the pipeline set it up: its recorded set_timesteps keywords
    (a pipeline may give sigmas or timesteps instead of a step count), else `steps` steps."""
    fresh = copy.deepcopy(scheduler)
    kwargs = dict(set_timesteps or {})
    if not any(k in kwargs for k in ("num_inference_steps", "sigmas", "timesteps")):
        kwargs["num_inference_steps"] = steps
    fresh.set_timesteps(**kwargs)
    return fresh


def _generator(step: int) -> torch.Generator:
    return torch.Generator().manual_seed(NOISE_SEED + step)


def _noise_like(x: torch.Tensor, step: int) -> torch.Tensor:
    """The noise step() draws from _generator(step) for a sample shaped like x."""
    from diffusers.utils.torch_utils import randn_tensor

    return randn_tensor(x.shape, generator=_generator(step), dtype=x.dtype)


def _scale(scheduler: Any, x: torch.Tensor, t: Any) -> torch.Tensor:
    """The model's input at this step (flow-matching schedulers have no scale_model_input: x itself)."""
    scale = getattr(scheduler, "scale_model_input", None)
    return x if scale is None else scale(x, t)


def _step(scheduler: Any, out: torch.Tensor, t: Any, x: torch.Tensor, index: int) -> torch.Tensor:
    kwargs = {"generator": _generator(index)} if "generator" in _parameters(scheduler) else {}
    return scheduler.step(out, t, x, return_dict=False, **kwargs)[0]


def _parameters(scheduler: Any) -> tuple[str, ...]:
    import inspect

    return tuple(inspect.signature(scheduler.step).parameters)


def refuse_unsupported(scheduler: Any) -> None:
    """Raises QexportError unless the scheduler is a supported class without clamping switched on."""
    name = type(scheduler).__name__
    if name not in SUPPORTED:
        raise QexportError(
            f"scheduler {name} is not supported at the edge; use one of {', '.join(SUPPORTED)} "
            "(set scheduler/scheduler_config.json's _class_name, or pass the pipeline another scheduler)"
        )
    for key in NONLINEAR_KEYS:
        if scheduler.config.get(key):
            raise QexportError(
                f"scheduler {name} with {key}=true clamps inside step(), which is not linear in its inputs; "
                f"set {key} to false in its scheduler_config.json"
            )


@torch.no_grad()
def probe(scheduler: Any, steps: int, set_timesteps: dict[str, Any] | None = None) -> dict[str, Any]:
    """The manifest's scheduler block for `steps` steps of this scheduler (see the module doc).

    Raises:
        QexportError: an unsupported class or a clamping config, or noise that is not additive.
    """
    refuse_unsupported(scheduler)
    lanes, zero = _ready(scheduler, steps, set_timesteps), _ready(scheduler, steps, set_timesteps)
    times = list(lanes.timesteps)
    n = len(times)
    rows = []
    for i, t in enumerate(times):
        x = torch.zeros(1, 2 * n, dtype=torch.float64)
        x[0, i] = 1.0
        out = torch.zeros(1, 2 * n, dtype=torch.float64)
        out[0, n + i] = 1.0
        scaled = _scale(lanes, x, t)
        _scale(zero, torch.zeros_like(x), t)
        moved = _step(lanes, out, t, x, i).double()
        base = _step(zero, torch.zeros_like(out), t, torch.zeros_like(x), i).double()
        coef = (moved - base)[0]
        noise = _noise_like(x, i)
        k = int(torch.argmax(noise.abs()))
        c = float(base[0, k] / noise[0, k]) + 0.0  # no -0.0 in the manifest
        if not torch.allclose(base, c * noise, rtol=1e-6, atol=1e-12):
            raise QexportError(f"scheduler {type(scheduler).__name__}'s noise at step {i} is not additive")
        rows.append({
            "timestep": float(t),
            "input_scale": float(scaled[0, i]),
            "x": [[j, float(coef[j])] for j in range(i + 1) if float(coef[j]) != 0.0],
            "out": [[j, float(coef[n + j])] for j in range(i + 1) if float(coef[n + j]) != 0.0],
            "noise": c,
        })  # fmt: skip
    return {
        "class": type(scheduler).__name__,
        "config": {k: v for k, v in scheduler.config.items() if not k.startswith("_")},
        "set_timesteps": dict(set_timesteps or {}),
        "init_noise_sigma": float(getattr(lanes, "init_noise_sigma", 1.0)),  # flow matching: none
        "steps": rows,
    }


def apply(
    block: dict[str, Any], i: int, xs: list[np.ndarray], outs: list[np.ndarray], noise: np.ndarray | None
) -> np.ndarray:
    """x[i+1] from the block's step i, the samples x[0..i] and model outputs out[0..i] (float64)."""
    step = block["steps"][i]
    x = sum((a * xs[j] for j, a in step["x"]), np.zeros_like(xs[i]))
    x = x + sum((b * outs[j] for j, b in step["out"]), np.zeros_like(xs[i]))
    if step["noise"]:
        if noise is None:
            raise QexportError(f"step {i} of scheduler {block['class']} needs noise")
        x = x + step["noise"] * noise
    return x


@torch.no_grad()
def check(scheduler: Any, block: dict[str, Any], shape: tuple[int, ...] = (1, 4, 8, 8), seed: int = 0) -> list[float]:
    """Run the scheduler itself on random samples and outputs and compare every step with the block.

    Returns:
        Per step, |block update - scheduler.step| / |scheduler.step| (max over elements / norm).

    Raises:
        QexportError: a step beyond CHECK_RTOL (the scheduler is not linear as probed).
    """
    real = _ready(scheduler, len(block["steps"]), block["set_timesteps"])
    rng = np.random.default_rng(seed)
    x = torch.from_numpy(rng.standard_normal(shape, dtype=np.float32) * np.float32(block["init_noise_sigma"]))
    xs, outs, errors = [x.double().numpy()], [], []
    for i, t in enumerate(real.timesteps):
        scaled = _scale(real, x, t)
        want = block["steps"][i]["input_scale"] * xs[i]
        scale_error = float(np.abs(scaled.double().numpy() - want).max() / max(np.abs(want).max(), 1e-30))
        out = torch.from_numpy(rng.standard_normal(shape, dtype=np.float32))
        outs.append(out.double().numpy())
        x = _step(real, out, t, x, i)
        noise = _noise_like(x, i).double().numpy()
        got = apply(block, i, xs, outs, noise)
        ref = x.double().numpy()
        error = max(float(np.linalg.norm(got - ref)) / max(float(np.linalg.norm(ref)), 1e-30), scale_error)
        errors.append(error)
        if error > CHECK_RTOL:
            raise QexportError(
                f"scheduler {block['class']}'s step {i} is not reproduced by its probed coefficients "
                f"({error:.2e} relative, allowed {CHECK_RTOL:.0e}); it is not linear in its inputs as configured"
            )
        xs.append(ref)
    return errors
