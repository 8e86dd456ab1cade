"""The scheduler at the edge: the coefficients probed from each supported diffusers scheduler
reproduce its step() on random inputs at every step (history-dependent solvers included), the
numpy edge scheduler follows the same trajectory, and what is not linear is refused by name."""

import diffusers
import numpy as np
import pytest
import torch

from qexport.errors import QexportError
from qexport.models.scheduler import CHECK_RTOL, apply, check, probe
from qexport.runtime.scheduler import EdgeScheduler, legacy_block

CASES = {
    "ddim": ("DDIMScheduler", {"clip_sample": False}, {}),
    "ddim-trailing-v": (
        "DDIMScheduler",
        {"clip_sample": False, "timestep_spacing": "trailing", "prediction_type": "v_prediction", "steps_offset": 1},
        {},
    ),
    "ddpm": ("DDPMScheduler", {"clip_sample": False}, {}),
    "euler": ("EulerDiscreteScheduler", {}, {}),
    "flow-shift": ("FlowMatchEulerDiscreteScheduler", {"shift": 3.0}, {}),
    "flow-dynamic-shift": ("FlowMatchEulerDiscreteScheduler", {"use_dynamic_shifting": True}, {"mu": 0.8}),
    "dpm++2m": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "solver_order": 2}, {}),
    "dpm++3m-v": ("DPMSolverMultistepScheduler", {"solver_order": 3, "prediction_type": "v_prediction"}, {}),
    "unipc": ("UniPCMultistepScheduler", {}, {}),
    "unipc-flow": (
        "UniPCMultistepScheduler",
        {"prediction_type": "flow_prediction", "use_flow_sigmas": True, "flow_shift": 3.0},
        {},
    ),
    "cogvideox-ddim": (
        "CogVideoXDDIMScheduler",
        {
            "clip_sample": False,
            "prediction_type": "v_prediction",
            "timestep_spacing": "trailing",
            "rescale_betas_zero_snr": True,
        },
        {},
    ),
}


def _made(name: str):
    cls, config, kwargs = CASES[name]
    return getattr(diffusers, cls)(**config), kwargs


@pytest.mark.parametrize("name", list(CASES))
def test_probed_coefficients_reproduce_every_step(name):
    scheduler, kwargs = _made(name)
    block = probe(scheduler, 12, kwargs)
    errors = check(scheduler, block, seed=3)
    assert len(errors) == 12 and max(errors) <= CHECK_RTOL, errors
    reach = max(i - j for i, s in enumerate(block["steps"]) for j, _ in [*s["x"], *s["out"]])
    if name.startswith(("dpm", "unipc")):
        assert reach >= 1  # multistep: later steps read earlier model outputs
    assert any(s["noise"] for s in block["steps"]) == (name == "ddpm")


@pytest.mark.parametrize("name", ["ddim", "flow-dynamic-shift", "dpm++2m", "unipc", "euler"])
def test_edge_scheduler_follows_the_torch_scheduler(name):
    """numpy float32 at the edge against the scheduler itself, on a trajectory whose model outputs
    depend on the sample (as a denoiser's do): within float32 rounding of the sample's scale."""
    scheduler, kwargs = _made(name)
    block = probe(scheduler, 10, kwargs)
    real = scheduler.__class__.from_config(scheduler.config)
    real.set_timesteps(10, **kwargs)
    edge = EdgeScheduler(block, seed=0)
    rng = np.random.default_rng(0)
    noise = rng.standard_normal((4, 8, 8), dtype=np.float32)
    w = rng.standard_normal((4, 4)).astype(np.float32) / 2
    x_t = torch.from_numpy(noise.copy()) * block["init_noise_sigma"]
    x_e = edge.start(noise)
    for i, t in enumerate(real.timesteps):
        seen_t = real.scale_model_input(x_t, t) if hasattr(real, "scale_model_input") else x_t
        seen_e = edge.model_input(i, x_e)
        assert np.abs(seen_e - seen_t.numpy()).max() <= 1e-5 * max(1.0, float(np.abs(seen_e).max()))
        out = np.tanh(np.einsum("ij,jhw->ihw", w, seen_e)).astype(np.float32)  # a denoiser-like function
        x_t = real.step(torch.from_numpy(out), t, x_t, return_dict=False)[0]
        x_e = edge.step(i, x_e, out)
    got, want = x_e, x_t.numpy()
    assert np.linalg.norm(got - want) <= 1e-5 * np.linalg.norm(want), np.linalg.norm(got - want) / np.linalg.norm(want)


def test_edge_noise_is_drawn_from_the_seed_and_step():
    scheduler, kwargs = _made("ddpm")
    block = probe(scheduler, 5, kwargs)
    first, again = EdgeScheduler(block, seed=7), EdgeScheduler(block, seed=7)
    zeros = np.zeros((2, 3), dtype=np.float32)
    a = [first.step(i, zeros, zeros) for i in range(4)]
    b = [again.step(i, zeros, zeros) for i in range(4)]
    assert all(np.array_equal(p, q) for p, q in zip(a, b, strict=True))  # same seed: same noise
    assert not np.array_equal(a[0], a[1])  # a fresh draw per step
    assert not np.array_equal(a[0], EdgeScheduler(block, seed=8).step(0, zeros, zeros))
    assert np.array_equal(a[0], np.float32(block["steps"][0]["noise"]) * first.noise(0, zeros.shape))


def test_clamping_and_unknown_schedulers_are_refused_by_name():
    with pytest.raises(QexportError, match="DDIMScheduler with clip_sample=true clamps inside step"):
        probe(diffusers.DDIMScheduler(clip_sample=True), 4)
    with pytest.raises(QexportError, match="DPMSolverMultistepScheduler with thresholding=true"):
        probe(diffusers.DPMSolverMultistepScheduler(thresholding=True), 4)
    with pytest.raises(QexportError, match="scheduler PNDMScheduler is not supported at the edge"):
        probe(diffusers.PNDMScheduler(), 4)


def test_a_scheduler_that_is_not_linear_fails_the_check():
    """A supported class whose step() is changed to clamp: the probe's unit lanes stay inside the
    clamp, the check on random inputs does not."""

    class Clamped(diffusers.DDIMScheduler):
        def step(self, model_output, timestep, sample, *args, **kwargs):
            return super().step(model_output.clamp(-1, 1), timestep, sample, *args, **kwargs)

    Clamped.__name__ = "DDIMScheduler"
    scheduler = Clamped(clip_sample=False)
    block = probe(scheduler, 6)
    with pytest.raises(QexportError, match="DDIMScheduler's step 0 is not reproduced"):
        check(scheduler, block)


def test_manifests_with_the_affine_step_still_run():
    manifest = {"steps": [{"timestep": 999, "c_x": 1.5, "c_out": -0.5}, {"timestep": 499, "c_x": 2.0, "c_out": 0.25}]}
    block = legacy_block(manifest)
    xs, outs = [np.ones(3)], [np.full(3, 2.0)]
    assert np.allclose(apply(block, 0, xs, outs, None), 1.5 - 1.0)
    edge = EdgeScheduler.of(manifest, seed=0)
    x1 = edge.step(0, np.ones(3, dtype=np.float32), np.full(3, 2.0, dtype=np.float32))
    assert np.array_equal(x1, np.float32(1.5) * np.ones(3, np.float32) + np.float32(-0.5) * np.full(3, 2.0, np.float32))
