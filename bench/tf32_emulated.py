"""The accuracy cost of ``replay.scoring: tf32`` measured on the CPU, where there are no tensor
cores: a build whose search scoring passes round the inputs of every linear, convolution and
attention to TF32 (10 mantissa bits, to nearest as the tensor cores' conversion does; sums stay
fp32) — what TF32 matmuls compute, up to the order of the sums. Everything else (the FP
references, GPTQ's and the observers' layer inputs, the emitted model) is exact fp32, as on a GPU.
Build the fp32 twin with qexport build, then compare the two with qexport eval:

    python bench/tf32_emulated.py --stats s20.qstats -o tf32 --recipe w8a8-best --set gptq=on
    qexport build s20.qstats --recipe w8a8-best --set gptq=on -o fp32 --no-verify
    qexport eval fp32 tf32 --seeds 0
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from qexport.exporter import replay
from qexport.exporter.build import BuildConfig, build

from qexport.recipe import load_recipe, with_settings


def to_tf32(x: torch.Tensor) -> torch.Tensor:
    """x (float32) with its mantissa rounded to TF32's 10 bits, half away from zero."""
    if x.dtype != torch.float32:
        return x
    bits = x.contiguous().view(torch.int32)
    return torch.bitwise_and(bits + 0x1000, -0x2000).view(torch.float32)


@contextmanager
def tf32_inputs() -> Iterator[None]:
    """Within the block, F.linear, F.conv1d/2d/3d and scaled_dot_product_attention see TF32 inputs."""
    names = ("linear", "conv1d", "conv2d", "conv3d", "scaled_dot_product_attention")
    saved = {name: getattr(F, name) for name in names}

    def rounded(fn: Callable[..., Any]) -> Callable[..., Any]:
        def call(*args: Any, **kwargs: Any) -> Any:
            args = tuple(to_tf32(a) if isinstance(a, torch.Tensor) else a for a in args)
            kwargs = {k: to_tf32(v) if isinstance(v, torch.Tensor) and k != "bias" else v for k, v in kwargs.items()}
            return fn(*args, **kwargs)

        return call

    try:
        for name, fn in saved.items():
            setattr(F, name, rounded(fn))
        yield
    finally:
        for name, fn in saved.items():
            setattr(F, name, fn)


def emulated_scored(self: replay.CalibrationReplay, k: int) -> np.ndarray:
    """CalibrationReplay.scored with TF32 inputs on any device (the recipe's replay.scoring aside)."""
    with tf32_inputs():
        return self.run(k)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--stats", type=Path, required=True)
    parser.add_argument("-o", "--output", type=Path, required=True)
    parser.add_argument("--recipe", default="w8a8-best")
    parser.add_argument("--set", dest="settings", action="append", default=[], metavar="KEY=VALUE")
    a = parser.parse_args()
    recipe = with_settings(load_recipe(a.recipe), [*a.settings, "replay.scoring=tf32"])
    replay.CalibrationReplay.scored = emulated_scored  # type: ignore[method-assign]
    result = build(a.stats, a.output, BuildConfig(recipe=recipe, force=True))
    choices = [(c["alpha"], c["act_shrink"]) for c in result.manifest["choices"]]
    print(f"wrote {a.output}: {len(result.ranges)} models, scored with TF32 inputs (emulated); choices {choices}")


if __name__ == "__main__":
    main()
