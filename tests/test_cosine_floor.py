"""verify's cosine floor: 0.999 where the simulation is steady, lower only as far as the simulation
itself moves when its input moves by PERTURBATION, and the same floor for a second runtime."""

import numpy as np
from qexport.verification.verify import COSINE_FLOOR, LSB_FACTOR, ModelCheck, RuntimeCheck, cosine_floor

from qexport.metrics import cosine


def _moved(sim: np.ndarray, spread: float, rng: np.random.Generator) -> np.ndarray:
    """sim plus orthogonal noise sized so that 1 - cos(sim, moved) is about `spread`."""
    noise = rng.standard_normal(sim.shape).astype(np.float32)
    noise -= sim * float(noise.ravel() @ sim.ravel() / (sim.ravel() @ sim.ravel()))
    ratio = np.sqrt(2 * spread)  # 1 - cos = 1 - 1/sqrt(1 + r^2) ~ r^2 / 2
    return sim + noise * (ratio * np.linalg.norm(sim) / np.linalg.norm(noise))


def test_steady_simulation_keeps_the_floor() -> None:
    sim = np.random.default_rng(0).standard_normal((2, 3, 8, 8)).astype(np.float32)
    assert cosine_floor(sim, sim) == COSINE_FLOOR
    assert cosine_floor(sim, _moved(sim, 1e-5, np.random.default_rng(1))) == COSINE_FLOOR  # 4e-5 < 1e-3


def test_a_moving_simulation_lowers_the_floor_by_its_own_spread() -> None:
    rng = np.random.default_rng(0)
    sim = rng.standard_normal((2, 3, 8, 8)).astype(np.float32)
    moved = _moved(sim, 1.8e-3, rng)  # tiny-latte W8A8 closed linears, last step: cos 0.9982 moved by 1e-6
    spread = 1.0 - cosine(sim, moved)
    floor = cosine_floor(sim, moved)
    assert floor == 1.0 - LSB_FACTOR**2 * spread
    assert 0.99 < floor < COSINE_FLOOR


def test_ok_judges_both_runtimes_by_the_models_floor() -> None:
    def check(cos: float, second: float | None = None) -> ModelCheck:
        other = None if second is None else RuntimeCheck(runtime="qnn-htp", cosine_sim=second, lsb_judged=False)
        return ModelCheck(model="step_19.onnx", steps=[19], cosine_sim=cos, cosine_floor=0.9939, max_lsb_sim=17.2,
                          lsb_bound=62.1, second=other)  # fmt: skip

    assert check(0.9985).ok
    assert not check(0.9930).ok  # below the floor the simulation's spread allows
    assert check(0.9985, second=0.9973).ok
    assert not check(0.9985, second=0.9900).ok
    steady = ModelCheck(model="step_00.onnx", steps=[0], cosine_sim=0.9985, max_lsb_sim=1.0, lsb_bound=14.0)
    assert not steady.ok  # the default floor: 0.999
