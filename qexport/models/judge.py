"""The shapes judge: from pixels alone, detect colour, shape and motion direction of a clip,
and score prompt adherence and temporal consistency (stand-ins for CLIPSIM and CLIP-temp).

Works on uint8 clips [F, H, W, 3] (a single image is a one-frame clip). Numpy only.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from qexport.models.shapes import COLOURS, DIRECTIONS, SHAPES

FOREGROUND_DISTANCE = 0.22  # max channel distance from the background colour, in [0, 1]
MIN_PIXELS = 6  # a smaller foreground component is no shape at all
EDGE_SHARE = 0.2  # box edges: rows/columns holding at least this share of the fullest one


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


def _largest_component(mask: np.ndarray) -> np.ndarray:
    """The largest 4-connected foreground component (drops stray pixels)."""
    labels = np.zeros(mask.shape, dtype=np.int32)
    best, best_size, current = 0, 0, 0
    height, width = mask.shape
    for r0, c0 in zip(*np.nonzero(mask), strict=True):
        if labels[r0, c0]:
            continue
        current += 1
        labels[r0, c0] = current
        stack, size = [(r0, c0)], 0
        while stack:
            r, c = stack.pop()
            size += 1
            for rr, cc in ((r + 1, c), (r - 1, c), (r, c + 1), (r, c - 1)):
                if 0 <= rr < height and 0 <= cc < width and mask[rr, cc] and not labels[rr, cc]:
                    labels[rr, cc] = current
                    stack.append((rr, cc))
        if size > best_size:
            best, best_size = current, size
    return np.asarray(labels == best) if best else mask


def _templates(height: int, width: int) -> dict[str, np.ndarray]:
    """Each shape inscribed in a height x width box, sampled at pixel centres."""
    v, u = np.mgrid[0:height, 0:width].astype(np.float64)
    u = (u + 0.5) / width * 2 - 1  # -1..1 across the box
    v = (v + 0.5) / height * 2 - 1
    return {
        "circle": u * u + v * v <= 1.0,
        "square": np.ones((height, width), dtype=bool),
        "triangle": np.abs(u) <= (v + 1) / 2,  # apex up
    }


def _shape_of(mask: np.ndarray) -> str | None:
    """The shape whose template, inscribed in the component's box (full or trimmed), has the highest IoU."""
    component = _largest_component(mask)
    rows, cols = np.nonzero(component)
    if rows.size < MIN_PIXELS:
        return None
    row_counts, col_counts = component.sum(axis=1), component.sum(axis=0)
    keep_rows = np.nonzero(row_counts >= EDGE_SHARE * row_counts.max())[0]
    keep_cols = np.nonzero(col_counts >= EDGE_SHARE * col_counts.max())[0]
    boxes = [
        component[rows.min() : rows.max() + 1, cols.min() : cols.max() + 1],
        # trimmed of thin protrusions, so a chipped square still fills its box
        component[keep_rows.min() : keep_rows.max() + 1, keep_cols.min() : keep_cols.max() + 1],
    ]
    ious: dict[str, float] = {}
    for box in boxes:
        for name, template in _templates(*box.shape).items():
            iou = np.count_nonzero(box & template) / np.count_nonzero(box | template)
            ious[name] = max(ious.get(name, 0.0), iou)
    return max(ious, key=lambda k: ious[k])


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
