"""The shapes judge: from pixels alone, detect colour, shape and motion direction of a clip,
and score prompt adherence and temporal consistency (stand-ins for CLIPSIM and CLIP-temp).

Works on uint8 clips [F, H, W, 3] (a single image is a one-frame clip). Numpy only.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from qexport.models.shapes import COLOURS, DIRECTIONS, SHAPES

FOREGROUND_DISTANCE = 0.22  # max channel distance from the background colour, in [0, 1]
SQUARE_FILL = 0.93  # a square fills its bounding box; circle 0.69-0.86, triangle 0.5-0.62
SQUARE_CORNERS_FILL = 0.8  # ... or fills most of it and has 3+ of its box corners set
TRIANGLE_BOTTOM_TOP = 1.6  # a triangle (apex up) has far more pixels in its lower half


@dataclass(frozen=True, kw_only=True)
class Detection:
    """What the judge saw in one clip; None where nothing could be decided."""

    colour: str | None
    shape: str | None
    direction: str | None


@dataclass(frozen=True, kw_only=True)
class JudgeReport:
    """Accuracy per attribute, prompt adherence (mean over attributes), temporal consistency."""

    count: int
    accuracy: dict[str, float]
    adherence: float
    temporal_consistency: float | None
    detections: list[Detection] = field(default_factory=list, repr=False)


def _foreground(frame: np.ndarray) -> np.ndarray:
    background = np.median(frame.reshape(-1, 3), axis=0)
    return np.asarray(np.abs(frame - background).max(axis=-1) > FOREGROUND_DISTANCE)


def _shape_of(mask: np.ndarray) -> str | None:
    rows, cols = np.nonzero(mask)
    if rows.size < 6:
        return None
    top, bottom, left, right = rows.min(), rows.max(), cols.min(), cols.max()
    box = (bottom - top + 1) * (right - left + 1)
    fill = rows.size / box
    corners = sum(int(mask[r, c]) for r in (top, bottom) for c in (left, right))
    if fill >= SQUARE_FILL or (fill >= SQUARE_CORNERS_FILL and corners >= 3):
        return "square"
    middle = (top + bottom) / 2.0
    upper = int(np.count_nonzero(rows < middle))
    lower = int(np.count_nonzero(rows > middle))
    if lower >= TRIANGLE_BOTTOM_TOP * max(upper, 1):
        return "triangle"
    return "circle"


def _vote(values: list[str | None]) -> str | None:
    seen = [v for v in values if v is not None]
    if not seen:
        return None
    names, counts = np.unique(seen, return_counts=True)
    return str(names[int(np.argmax(counts))])


def detect(clip: np.ndarray) -> Detection:
    """Detect colour, shape and (for two or more frames) direction in a uint8 [F, H, W, 3] clip."""
    frames = np.asarray(clip, dtype=np.float64) / 255.0
    if frames.ndim == 3:
        frames = frames[None]
    masks = [_foreground(f) for f in frames]
    pixels = [f[m] for f, m in zip(frames, masks, strict=True) if m.any()]
    colour = None
    if pixels:
        mean = np.median(np.concatenate(pixels), axis=0)
        names = list(COLOURS)
        dist = [np.linalg.norm(mean - np.asarray(COLOURS[n])) for n in names]
        colour = names[int(np.argmin(dist))]
    shape = _vote([_shape_of(m) for m in masks])
    direction = _direction_of(masks) if len(masks) > 1 else None
    return Detection(colour=colour, shape=shape, direction=direction)


def _direction_of(masks: list[np.ndarray]) -> str | None:
    t, xs, ys = [], [], []
    for i, m in enumerate(masks):
        rows, cols = np.nonzero(m)
        if rows.size:
            t.append(i)
            xs.append(cols.mean())
            ys.append(rows.mean())
    if len(t) < 2:
        return None
    vx = float(np.polyfit(t, xs, 1)[0])
    vy = float(np.polyfit(t, ys, 1)[0])
    scores = {name: vx * dx + vy * dy for name, (dx, dy) in DIRECTIONS.items()}
    return max(scores, key=lambda k: scores[k])


def temporal_consistency(clip: np.ndarray) -> float:
    """Mean cosine similarity of consecutive frames, each centred on its own mean."""
    frames = np.asarray(clip, dtype=np.float64).reshape(len(clip), -1)
    frames = frames - frames.mean(axis=1, keepdims=True)
    a, b = frames[:-1], frames[1:]
    cos = (a * b).sum(1) / np.maximum(np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1), 1e-12)
    return float(cos.mean())


def parse_caption(text: str) -> dict[str, str]:
    """Attributes named in a caption ("a red circle moving left") or a label ("red circle")."""
    words = text.lower().split()
    found: dict[str, str] = {}
    for w in words:
        if w in COLOURS:
            found["colour"] = w
        elif w in SHAPES:
            found["shape"] = w
        elif w in DIRECTIONS:
            found["direction"] = w
    return found


def score(clips: np.ndarray | list[np.ndarray], captions: list[str]) -> JudgeReport:
    """Judge clips against their captions.

    Args:
        clips: uint8 clips [N, F, H, W, 3] (or images [N, H, W, 3]).
        captions: one caption or label per clip; only the attributes it names are scored.

    Returns:
        Per-attribute accuracy, adherence (mean of the per-attribute accuracies) and, for
        clips of two or more frames, temporal consistency.
    """
    if len(clips) != len(captions):
        raise ValueError(f"{len(clips)} clips but {len(captions)} captions")
    hits: dict[str, list[bool]] = {"colour": [], "shape": [], "direction": []}
    detections, tc = [], []
    for clip, caption in zip(clips, captions, strict=True):
        d = detect(clip)
        detections.append(d)
        for key, want in parse_caption(caption).items():
            hits[key].append(getattr(d, key) == want)
        if np.asarray(clip).ndim == 4 and len(clip) > 1:
            tc.append(temporal_consistency(clip))
    accuracy = {k: float(np.mean(v)) for k, v in hits.items() if v}
    adherence = float(np.mean(list(accuracy.values()))) if accuracy else 0.0
    return JudgeReport(
        count=len(captions),
        accuracy=accuracy,
        adherence=adherence,
        temporal_consistency=float(np.mean(tc)) if tc else None,
        detections=detections,
    )
