"""Checks and settings the CLI applies to its arguments before any work: which conditioning text a
model takes, thread counts, the existence of input files, the options of consent to load a model
folder a file names. Torch is imported only when asked for."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from qexport.errors import QexportError


def conditioning_text(kind: str, prompt: str | None, label: str | None) -> str:
    """The one text a model takes: ``--prompt`` for a caption model, ``--label`` for a class label.

    kind: "caption" (text-conditioned) or "label" (class-conditional).

    Raises:
        QexportError: both given, none given, or the one the model does not take.
    """
    if prompt is not None and label is not None:
        raise QexportError("give --prompt or --label, not both")
    if kind == "label":
        if prompt is not None:
            raise QexportError("this model is class-conditional: give --label (e.g. 'red circle'), not --prompt")
        if label is None:
            raise QexportError("this model is class-conditional: give --label (e.g. 'red circle')")
        return label
    if label is not None:
        raise QexportError(
            "this model is text-conditioned: give --prompt (e.g. 'a red circle moving left'), not --label"
        )
    if prompt is None:
        raise QexportError("this model is text-conditioned: give --prompt (e.g. 'a red circle moving left')")
    return prompt


def check_threads(threads: int | None) -> int | None:
    """threads, if None (the runtime's default) or at least 1.

    Raises:
        QexportError: a count below 1.
    """
    if threads is not None and threads < 1:
        raise QexportError(f"--threads must be 1 or more, got {threads}")
    return threads


def set_threads(threads: int | None) -> None:
    """Use `threads` CPU threads in torch as well (onnxruntime sessions take them per session).

    Raises:
        QexportError: a count below 1.
    """
    count = check_threads(threads)
    if count is None:
        return
    import torch

    torch.set_num_threads(count)


def check_device(device: str, option: str) -> str:
    """device, if torch can run there (checked before any work that would end on it).

    Raises:
        QexportError: not a torch device, or a CUDA device torch does not see.
    """
    import torch

    try:
        where = torch.device(device)
    except RuntimeError:
        raise QexportError(f"{option} {device!r} is not a torch device; give cpu or cuda") from None
    if where.type == "cuda" and not torch.cuda.is_available():
        raise QexportError(f"{option} {device}: torch sees no CUDA device here; use {option} cpu")
    return device


def existing_file(path: Path, what: str, fix: str) -> Path:
    """path, if it is a file.

    Raises:
        QexportError: naming the path, what it should be and how to get one.
    """
    if not path.is_file():
        raise QexportError(f"{what} {path} does not exist; {fix}")
    return path


def pipeline_call(items: tuple[str, ...]) -> dict[str, Any]:
    """``--call KEY=VALUE`` options as the keyword arguments of a pipeline's __call__ (each value
    read as YAML: 512, 4.5, false, [1, 2], text).

    Raises:
        QexportError: an item without ``=`` or without a key.
    """
    import yaml

    call: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise QexportError(f"--call takes KEY=VALUE, got {item!r}")
        call[key] = yaml.safe_load(value)
    return call


def model_options(command: Any) -> Any:
    """``--model`` and ``--trust-model-path``: the consent a command needs to load a model folder that
    a file (.qstats, manifest.json) names (models.registry.ModelRequest); built-in names need none."""
    trust = click.option(
        "--trust-model-path", is_flag=True, help="Load the model folder the file names (its writer chose that path)."
    )
    own = click.option(
        "--model",
        "model",
        metavar="FOLDER",
        help="The model the file was made from, loaded instead of the path the file names: a folder, "
        "diffusers:FOLDER, pipeline:FOLDER or a built-in name (its config must match the file's).",
    )
    return own(trust(command))
