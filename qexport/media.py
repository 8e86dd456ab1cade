"""Write clips and images as GIF / PNG, files and build folders atomically (temporary, then rename)."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
from PIL import Image


def atomic_write(path: Path, save: Callable[[str], object]) -> None:
    """Call save(temp_path) in path's folder, then rename onto path; nothing is left on failure."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=path.suffix)
    os.close(fd)
    try:
        save(tmp)
        os.chmod(tmp, 0o644)  # mkstemp makes files private; outputs are ordinary files
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


@contextmanager
def written_whole(out: Path) -> Iterator[Path]:
    """A fresh hidden folder beside `out` to write a build into. When the block ends, the folder
    replaces `out` (an existing one removed) and becomes readable by all; when it raises, the folder
    is removed: `out` is whole or untouched, never half-written."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.building-"))
    try:
        yield tmp
        tmp.chmod(0o755)  # mkdtemp makes folders private; a build is an ordinary folder
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _upscale(frame: np.ndarray, scale: int) -> Image.Image:
    image = Image.fromarray(frame)
    return image.resize((image.width * scale, image.height * scale), Image.Resampling.NEAREST)


def strip(clip: np.ndarray) -> np.ndarray:
    """Frames [F, H, W, 3] side by side as one image [H, F*W, 3]."""
    return np.concatenate(list(clip), axis=1)


def save_gif(path: Path, clip: np.ndarray, scale: int = 4, fps: int = 8) -> None:
    """An animated GIF of a uint8 clip [F, H, W, 3], frames enlarged by scale."""
    frames = [_upscale(f, scale) for f in clip]
    atomic_write(
        path,
        lambda p: frames[0].save(
            p, format="GIF", save_all=True, append_images=frames[1:], duration=1000 // fps, loop=0
        ),
    )


def save_png(path: Path, image: np.ndarray, scale: int = 4) -> None:
    """A PNG of a uint8 image [H, W, 3], enlarged by scale."""
    picture = _upscale(image, scale)
    atomic_write(path, lambda p: picture.save(p, format="PNG"))


def output_paths(output: Path, video: bool) -> tuple[Path, ...]:
    """The files ``-o output`` writes: (clip.gif, clip.png strip) for video, (image.png,) for an image.

    Raises:
        QexportError: a suffix the model's output cannot be written as (e.g. .gif for an image).
    """
    from qexport.errors import QexportError

    suffix = output.suffix.lower()
    if video:
        if suffix not in ("", ".gif", ".png"):
            raise QexportError(f"-o {output}: this model makes clips, written as .gif (and a .png strip); "
                               "give a .gif path")  # fmt: skip
        return output.with_suffix(".gif"), output.with_suffix(".png")
    if suffix not in ("", ".png"):
        raise QexportError(f"-o {output}: this model makes images, written as PNG; give a .png path")
    return (output.with_suffix(".png"),)
