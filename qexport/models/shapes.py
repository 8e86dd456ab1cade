"""Deterministic moving-shapes data: short RGB clips of one coloured shape moving over a
mildly noisy background, each with a caption such as "a red circle moving left".

Pure numpy; the judge (``judge.py``) reads the same palette and geometry.
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import product

import numpy as np

COLOURS: dict[str, tuple[float, float, float]] = {
    "red": (0.92, 0.12, 0.12),
    "green": (0.15, 0.80, 0.20),
    "blue": (0.15, 0.30, 0.95),
    "yellow": (0.95, 0.90, 0.15),
    "magenta": (0.90, 0.15, 0.85),
    "cyan": (0.15, 0.90, 0.90),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
DIRECTIONS: dict[str, tuple[int, int]] = {  # (dx, dy) in pixels per frame; image rows grow downwards
    "left": (-1, 0),
    "right": (1, 0),
    "up": (0, -1),
    "down": (0, 1),
}
FRAMES = 16
SIZE = 32
SPEED = 1.0  # pixels per frame
RADIUS_RANGE = (4.5, 6.0)
BACKGROUND_RANGE = (0.25, 0.45)
BACKGROUND_NOISE = 0.04


@dataclass(frozen=True, kw_only=True)
class ClipSpec:
    """Everything that decides one clip's pixels."""

    colour: str
    shape: str
    direction: str
    seed: int

    @property
    def caption(self) -> str:
        return caption_of(self.colour, self.shape, self.direction)


def caption_of(colour: str, shape: str, direction: str) -> str:
    return f"a {colour} {shape} moving {direction}"


def label_of(colour: str, shape: str) -> str:
    return f"{colour} {shape}"


def all_combinations() -> list[tuple[str, str, str]]:
    """Every (colour, shape, direction), colour-major."""
    return list(product(COLOURS, SHAPES, DIRECTIONS))


def class_names() -> list[str]:
    """Image classes for the class-conditional model: colour x shape, colour-major."""
    return [label_of(c, s) for c, s in product(COLOURS, SHAPES)]


def eval_prompts() -> list[str]:
    """The fixed evaluation set: 24 captions, every colour 4x, every shape and direction covered."""
    return [caption_of(*combo) for combo in all_combinations()[::3]]


def _shape_mask(shape: str, xs: np.ndarray, ys: np.ndarray, cx: np.ndarray, cy: np.ndarray, r: float) -> np.ndarray:
    dx = xs[None] - cx[:, None, None]
    dy = ys[None] - cy[:, None, None]
    if shape == "circle":
        return np.asarray(dx * dx + dy * dy <= r * r)
    if shape == "square":
        return np.asarray((np.abs(dx) <= r) & (np.abs(dy) <= r))
    if shape == "triangle":  # apex up, base 2r wide at the bottom, height 2r
        return np.asarray((dy >= -r) & (dy <= r) & (np.abs(dx) <= (dy + r) / 2.0))
    raise ValueError(f"unknown shape {shape!r}; choose from {list(SHAPES)}")


def render(spec: ClipSpec, frames: int = FRAMES, size: int = SIZE, moving: bool = True) -> np.ndarray:
    """Render one clip as uint8 [frames, size, size, 3].

    Args:
        spec: colour, shape, direction and the seed for position, radius and background.
        frames: number of frames.
        size: height and width in pixels.
        moving: False keeps the shape still (single images for the class-conditional model).

    Returns:
        The clip, uint8 RGB.
    """
    rng = np.random.default_rng(spec.seed)
    r = float(rng.uniform(*RADIUS_RANGE))
    dxf, dyf = DIRECTIONS[spec.direction] if moving else (0, 0)
    travel = SPEED * (frames - 1)
    lo, hi = r + 0.5, size - 1.5 - r

    def start(d: int) -> float:
        if d < 0:
            return float(rng.uniform(lo + travel, hi))
        if d > 0:
            return float(rng.uniform(lo, hi - travel))
        return float(rng.uniform(lo, hi))

    x0, y0 = start(dxf), start(dyf)
    t = np.arange(frames, dtype=np.float64)
    cx, cy = x0 + dxf * SPEED * t, y0 + dyf * SPEED * t
    grey = rng.uniform(*BACKGROUND_RANGE)
    background = grey + BACKGROUND_NOISE * rng.standard_normal((size, size, 3))
    ys, xs = np.mgrid[0:size, 0:size].astype(np.float64)
    mask = _shape_mask(spec.shape, xs, ys, cx, cy, r)
    colour = np.asarray(COLOURS[spec.colour]) + 0.03 * rng.standard_normal(3)
    clip = np.where(mask[..., None], colour[None, None, None], background[None])
    return np.clip(np.round(clip * 255.0), 0, 255).astype(np.uint8)


def spec_for(index: int, seed: int = 0) -> ClipSpec:
    """The index-th clip of a dataset: attributes cycle through every combination."""
    combos = all_combinations()
    rng = np.random.default_rng([seed, index])
    colour, shape, direction = combos[int(rng.integers(len(combos)))]
    return ClipSpec(colour=colour, shape=shape, direction=direction, seed=int(rng.integers(2**31)))


def make_dataset(n: int, seed: int = 0, moving: bool = True) -> tuple[np.ndarray, list[ClipSpec]]:
    """n deterministic clips: uint8 [n, F, H, W, 3] and their specs."""
    specs = [spec_for(i, seed) for i in range(n)]
    clips = np.stack([render(s, moving=moving) for s in specs]) if n else np.zeros((0, FRAMES, SIZE, SIZE, 3), np.uint8)
    return clips, specs
