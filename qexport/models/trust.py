"""What qexport loads on a folder's word: weights from safetensors only (a pickled checkpoint is
refused, never opened), component classes of diffusers and transformers only (never code that ships
in the folder), tokenizers from tokenizer.json. Checks files and names; loads nothing itself."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from qexport.errors import QexportError

PICKLED = (".bin", ".pt", ".pth", ".ckpt", ".pkl")  # pickled checkpoints: unpickling one can run code
LIBRARIES = ("diffusers", "transformers")  # where a pipeline folder's component classes may come from
TOKENIZER_FILE = "tokenizer.json"
CONVERT = "load it once in Python you trust and save_pretrained(..., safe_serialization=True)"
_AUTO = re.compile(r"(^|\.)(auto|auto_\w+|\w+_auto)(\.|$)")  # transformers' models.auto, diffusers' auto_model


def refuse_pickled(folder: Path) -> None:
    """Refuse a model folder whose weights are pickled checkpoints, with no .safetensors beside them.

    Raises:
        QexportError: naming the checkpoint and how to convert it.
    """
    if not folder.is_dir() or any(folder.glob("*.safetensors")):
        return
    pickled = sorted(p for p in folder.iterdir() if p.suffix in PICKLED and p.is_file())
    if pickled:
        raise QexportError(
            f"{pickled[0]} is a pickled checkpoint and {folder} has no .safetensors weights; qexport loads "
            f"safetensors only (unpickling can run code): {CONVERT}"
        )


def check_pipeline_index(folder: Path, index: dict[str, Any], own: tuple[str, ...] = ()) -> None:
    """Refuse a model_index.json that would make diffusers import code: a pipeline class diffusers
    lacks (a custom pipeline), a component class from another module, an auto class (it picks its
    class from the folder's config), a ``<library>.py`` in a component's folder (diffusers imports it
    as the component's code), pickled weights, or a tokenizer without tokenizer.json. `own`: the
    pipeline classes of qexport itself, whose components qexport loads.

    Raises:
        QexportError: naming model_index.json (or the component's file), the class and what is taken.
    """
    import diffusers

    path = folder / "model_index.json"
    pipeline = index.get("_class_name")
    ours = isinstance(pipeline, str) and pipeline in own
    cls = getattr(diffusers, pipeline, None) if isinstance(pipeline, str) else None
    if not ours and not (isinstance(cls, type) and issubclass(cls, diffusers.DiffusionPipeline)):
        raise QexportError(
            f"{path} names pipeline class {pipeline!r}, which diffusers lacks; qexport loads diffusers' own "
            "pipeline classes only (never a custom pipeline's code)"
        )
    for name, spec in index.items():
        if name.startswith("_") or not isinstance(spec, list) or len(spec) != 2 or spec[0] is None:
            continue
        library, class_name = str(spec[0]), str(spec[1])
        if ours and library == "qexport":
            continue
        component = _component_class(library, class_name)
        if component is None:
            raise QexportError(
                f"{path} names {library}.{class_name} for {name!r}; qexport loads diffusers and transformers "
                "classes only (a class of another module would be imported from code in the folder)"
            )
        if _AUTO.search(component.__module__):
            raise QexportError(
                f"{path} names the auto class {library}.{class_name} for {name!r}, which picks its class from "
                f"the folder's config; name the concrete class (save the pipeline with save_pretrained)"
            )
        code = folder / name / f"{library}.py"
        if code.exists():
            raise QexportError(f"{code} would be imported by diffusers as the code of component {name!r}; qexport "
                               "loads library classes only: remove it")  # fmt: skip
        refuse_pickled(folder / name)
        if _is_tokenizer(component) and not (folder / name / TOKENIZER_FILE).is_file():
            raise QexportError(
                f"{folder / name} has no {TOKENIZER_FILE}; qexport loads tokenizers from {TOKENIZER_FILE} only: "
                "save the tokenizer with transformers 5 (save_pretrained writes it)"
            )


def _component_class(library: str, class_name: str) -> type | None:
    """The class a component spec names, if it is one of diffusers' or transformers' own (a diffusers
    pipeline module, e.g. ``stable_diffusion``, counts as diffusers)."""
    if not library.isidentifier() or not class_name.isidentifier():
        return None
    import importlib

    if library in LIBRARIES:
        module: Any = importlib.import_module(library)
    else:
        from diffusers import pipelines

        module = getattr(pipelines, library, None)
        if getattr(module, "__name__", "") != f"diffusers.pipelines.{library}":
            return None
    found = getattr(module, class_name, None)
    return found if isinstance(found, type) else None


def _is_tokenizer(cls: type) -> bool:
    from transformers import PreTrainedTokenizerBase

    return issubclass(cls, PreTrainedTokenizerBase)
