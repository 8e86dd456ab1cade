"""The sampler at the edge, from the manifest's scheduler block (numpy only): the model is fed
``input_scale[i] * x[i]`` at ``timestep[i]``, and the next sample is a fixed linear combination of
the samples and model outputs so far (multistep solvers reach back several steps) plus, for
stochastic schedulers, ``noise[i]`` times fresh standard normal noise drawn from the seed."""

from __future__ import annotations

from typing import Any

import numpy as np

from qexport.errors import QexportError


def legacy_block(manifest: dict[str, Any]) -> dict[str, Any]:
    """The scheduler block of a manifest written before the block existed (schema <= 2): its steps
    carry the affine DDIM step x <- c_x * x + c_out * out."""
    steps = [{"timestep": float(s["timestep"]), "input_scale": 1.0, "x": [[i, s["c_x"]]], "out": [[i, s["c_out"]]],
              "noise": 0.0} for i, s in enumerate(manifest["steps"])]  # fmt: skip
    return {"class": "DDIMScheduler", "init_noise_sigma": 1.0, "steps": steps}


class EdgeScheduler:
    """One sampling run's scheduler state: the history the later steps read."""

    def __init__(self, block: dict[str, Any], seed: int) -> None:
        self.block, self.seed = block, seed
        self.steps: list[dict[str, Any]] = block["steps"]
        self.xs: dict[int, np.ndarray] = {}
        self.outs: dict[int, np.ndarray] = {}
        self._last_read: dict[int, int] = {}  # step j -> the last step that reads x[j] or out[j]
        for i, s in enumerate(self.steps):
            for j, _ in [*s["x"], *s["out"]]:
                if not 0 <= j <= i:
                    raise QexportError(f"the manifest's {block.get('class')} scheduler block reads a future step")
                self._last_read[j] = i
        if not self._last_read:
            raise QexportError(f"the manifest's {block.get('class')} scheduler block reads no step")

    @classmethod
    def of(cls, manifest: dict[str, Any], seed: int) -> EdgeScheduler:
        return cls(manifest.get("scheduler") or legacy_block(manifest), seed)

    def start(self, noise: np.ndarray) -> np.ndarray:
        """x[0] from the initial noise."""
        sigma = np.float32(self.block["init_noise_sigma"])
        return noise if sigma == 1.0 else (sigma * noise).astype(np.float32)

    def model_input(self, i: int, x: np.ndarray) -> np.ndarray:
        scale = np.float32(self.steps[i]["input_scale"])
        return x if scale == 1.0 else (scale * x).astype(np.float32)

    def noise(self, i: int, shape: tuple[int, ...]) -> np.ndarray:
        """Step i's fresh noise: numpy PCG64 seeded with (seed, i + 1), float32."""
        return np.random.default_rng([self.seed, i + 1]).standard_normal(shape, dtype=np.float32)

    def step(self, i: int, x: np.ndarray, out: np.ndarray) -> np.ndarray:
        """x[i+1] from x[i] (the sample the model saw, before input scaling) and the guided output."""
        self.xs[i], self.outs[i] = x, out
        rule = self.steps[i]
        terms = [np.float32(a) * self.xs[j] for j, a in rule["x"]] + [
            np.float32(b) * self.outs[j] for j, b in rule["out"]
        ]
        nxt: np.ndarray = terms[0]
        for t in terms[1:]:
            nxt = nxt + t
        if rule["noise"]:
            nxt = nxt + np.float32(rule["noise"]) * self.noise(i, x.shape)
        for j in [j for j in self.xs if self._last_read.get(j, -1) <= i]:  # no later step reads them
            self.xs.pop(j, None)
            self.outs.pop(j, None)
        return nxt.astype(np.float32)
