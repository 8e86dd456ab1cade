"""Write clips and images as GIF / PNG, files and build folders atomically (temporary, then rename)."""

from __future__ import annotations

import fcntl
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
def folder_lock(out: Path) -> Iterator[None]:
    """Hold an exclusive lock on writing `out` (a hidden ``.<name>.lock`` file beside it) for the
    block: a second qexport writing the same folder at once is refused, not interleaved.

    Raises:
        QexportError: another process holds the lock (its pid named).
    """
    from qexport.errors import QexportError

    out.parent.mkdir(parents=True, exist_ok=True)
    path = out.parent / f".{out.name}.lock"
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
            raise QexportError(
                f"another qexport (pid {holder}) is writing {out} now; wait for it to finish or choose another folder"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        yield
    finally:
        os.close(fd)  # releases the lock; the file stays (unlinking it would race with a waiting writer)


def _remove_stale(out: Path) -> None:
    """Remove the hidden temporary folders a killed build of `out` left beside it (called under the
    folder's lock, so none of them belongs to a running build)."""
    for pattern in (f".{out.name}.building-*", f".{out.name}.replaced-*"):
        for stale in out.parent.glob(pattern):
            shutil.rmtree(stale, ignore_errors=True)


@contextmanager
def written_whole(out: Path) -> Iterator[Path]:
    """A fresh hidden folder beside `out` to write a build into, under `out`'s lock. When the block
    ends, the folder replaces `out` (an existing one removed) and becomes readable by all; when it
    raises, the folder is removed: `out` is whole or untouched, never half-written. Temporary
    folders of killed builds of `out` (and a replaced `out` a kill left behind) are removed first.

    Raises:
        QexportError: another process is writing `out`.
    """
    out.parent.mkdir(parents=True, exist_ok=True)
    with folder_lock(out):
        _remove_stale(out)
        tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.building-"))
        try:
            yield tmp
            tmp.chmod(0o755)  # mkdtemp makes folders private; a build is an ordinary folder
            old = tmp.with_name(tmp.name.replace(".building-", ".replaced-"))
            if out.exists():
                out.rename(old)  # kept whole until the new folder is in place
            tmp.rename(out)
            shutil.rmtree(old, ignore_errors=True)
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
