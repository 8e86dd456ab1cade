"""Find and load models by name: built-ins (trained, shipped in the package), a user's
diffusers folder (``diffusers:/path``), or a named full-size config with random weights."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from qexport.errors import QexportError
from qexport.models import architectures
from qexport.models.adapter import SCHEDULER_CONFIG, ModelAdapter
from qexport.models.conditioning import (
    CaptionConditioner,
    Conditioner,
    LabelConditioner,
    MissingCaptionEncoder,
    SyntheticCaptionConditioner,
)
from qexport.models.families import FAMILIES, family_of
from qexport.models.text_encoder import CaptionEncoder, is_caption_encoder
from qexport.models.trust import refuse_pickled

log = logging.getLogger(__name__)

BUILTIN_DIR = Path(__file__).parent / "builtin"
BUILTINS = ("tiny-latte", "tiny-dit")
SCHEDULER_KEYS = ("num_train_timesteps", "beta_schedule", "beta_start", "beta_end", "trained_betas", "prediction_type")


@dataclass(frozen=True, kw_only=True)
class ModelInfo:
    """One row of ``qexport models``."""

    name: str
    class_name: str
    parameters: int | None
    size_bytes: int | None
    description: str
    random_init: bool


def model_names() -> list[str]:
    return [*BUILTINS, *architectures.FULL_SIZE]


@dataclass(frozen=True, kw_only=True)
class ModelRequest:
    """Which model a command may load when a file (a .qstats, a build's manifest.json) names it, and
    what that model must take. A built-in or full-size name is loaded as named; a folder the file
    names only with the user's consent: their own ``model`` (a folder, ``diffusers:FOLDER``,
    ``pipeline:FOLDER`` or a name; it must match the file's config hash), or ``trust_model_path``
    (load the folder the file names). ``conditions``: the prompts or class labels the command will
    run the model with, checked as soon as it is loaded, before any work."""

    model: str | None = None
    trust_model_path: bool = False
    conditions: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.model is not None and self.trust_model_path:
            raise QexportError("give --model PATH or --trust-model-path, not both")
        if self.model is not None and not self.model.strip():
            raise QexportError("--model is empty; give a model folder or a built-in name")

    def model_id(self, named: str, named_by: str, how: str) -> str:
        """The model id to load for a file that names `named`.

        Args:
            named_by: the file, as the error names it (e.g. ``run.qstats``).
            how: how the file came to name the model (e.g. "calibrated there").

        Raises:
            QexportError: a folder named by the file, without consent.
        """
        if self.model is not None:
            given = self.model.strip()
            if given in model_names() or given.startswith("diffusers:"):
                return given
            return f"diffusers:{given.removeprefix('pipeline:')}"
        if named in model_names() or self.trust_model_path:
            return named
        folder = named.removeprefix("diffusers:")
        raise QexportError(
            f"{named_by} names the model folder {folder} ({how}); pass --model {folder} to load it, "
            "or --trust-model-path"
        )


def load_model(name: str) -> ModelAdapter:
    """Load a model by name.

    Args:
        name: a built-in name, ``diffusers:/path/to/folder``, or a full-size config name.

    Raises:
        QexportError: unknown name, missing folder or weights, unsupported class.
    """
    if name in architectures.FULL_SIZE:
        return _full_size(name)
    return load_folder(_folder_of(name), model_id=name)


def check_conditions(name: str, texts: tuple[str, ...]) -> None:
    """Refuse a prompt or class label the model `name` does not take, from its conditioner alone
    (its transformer's weights are not loaded): a check before any work that would run it.

    Raises:
        QexportError: as load_model for the name; from the conditioner, naming the text and what it takes.
    """
    if not texts:
        return
    if name in architectures.FULL_SIZE:
        class_name, config, _ = architectures.FULL_SIZE[name]
        conditioner = _full_size_conditioner(class_name, config)
    else:
        folder = _folder_of(name)
        _, class_name, config, meta = _transformer_folder(folder)
        conditioner = _conditioner(folder, class_name, config, meta)
    conditioner.encode(list(texts))


def _folder_of(name: str) -> Path:
    """The folder of a built-in or ``diffusers:`` model name."""
    if name in BUILTINS:
        folder = BUILTIN_DIR / name
        if not (folder / "transformer" / "diffusion_pytorch_model.safetensors").is_file():
            raise QexportError(
                f"built-in model {name!r} has no weights at {folder}; reinstall qexport or train them with "
                f"`python -m qexport.models.train --model {name} --out {folder}`"
            )
        return folder
    if name.startswith("diffusers:"):
        return Path(name.removeprefix("diffusers:")).expanduser()
    raise QexportError(f"unknown model {name!r}; choose one of {', '.join(model_names())} or diffusers:/path/to/folder")


def read_json(path: Path) -> dict[str, Any]:
    """A JSON object from a file; one error line when it is unreadable or not an object."""
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise QexportError(f"cannot read {path}: {exc}") from exc
    if not isinstance(data, dict):
        raise QexportError(f"{path} is not a JSON object")
    return data


def _transformer_folder(folder: Path) -> tuple[Path, str, dict[str, Any], dict[str, Any]]:
    """A model folder's transformer folder, class name and config, and its model_index's qexport
    entries, read and checked without loading weights."""
    if not folder.is_dir():
        raise QexportError(f"model folder {folder} does not exist; pass diffusers:/path/to/a/saved/model")
    tdir = folder / "transformer" if (folder / "transformer" / "config.json").is_file() else folder
    if not (tdir / "config.json").is_file():
        raise QexportError(
            f"{folder} holds no diffusers transformer (no config.json in it or in transformer/); "
            "save one with save_pretrained"
        )
    config = read_json(tdir / "config.json")
    class_name = config.get("_class_name", "")
    if class_name not in FAMILIES:
        raise QexportError(
            f"{tdir / 'config.json'} is a {class_name or 'unnamed'} model; supported: {', '.join(FAMILIES)}"
        )
    if FAMILIES[class_name].call is None:
        raise QexportError(
            f"{class_name} is calibrated through its pipeline's own sampling loop; point at the pipeline "
            "folder (with model_index.json) and use qexport.calib.pipeline"
        )
    index = read_json(folder / "model_index.json") if (folder / "model_index.json").is_file() else {}
    return tdir, class_name, config, index.get("qexport", {})


def load_folder(folder: Path, *, model_id: str) -> ModelAdapter:
    """Load a diffusers pipeline folder (with transformer/) or a bare transformer folder; weights
    from safetensors only (models.trust).

    Raises:
        QexportError: no folder or transformer config, an unsupported class, pickled weights.
    """
    tdir, class_name, _, meta = _transformer_folder(folder)
    for part in (tdir, folder / "vae"):
        refuse_pickled(part)
    try:
        transformer = architectures.model_class(class_name).from_pretrained(
            str(tdir), torch_dtype=torch.float32, low_cpu_mem_usage=False, use_safetensors=True
        )
    except (OSError, ValueError, RuntimeError) as exc:
        raise QexportError(f"cannot load {class_name} from {tdir}: {exc}") from exc
    transformer.eval()
    cfg = dict(transformer.config)
    conditioner = _conditioner(folder, class_name, cfg, meta)
    scheduler = dict(SCHEDULER_CONFIG)
    sched_path = folder / "scheduler" / "scheduler_config.json"
    if sched_path.is_file():
        user = read_json(sched_path)
        scheduler.update({k: user[k] for k in SCHEDULER_KEYS if k in user})
    vae = None
    if (folder / "vae" / "config.json").is_file():
        from diffusers import AutoencoderKL

        vae = AutoencoderKL.from_pretrained(str(folder / "vae"), torch_dtype=torch.float32, use_safetensors=True)
        vae.eval()
    return ModelAdapter(
        model_id=model_id,
        class_name=class_name,
        transformer=transformer,
        conditioner=conditioner,
        latent_shape=_latent_shape(class_name, cfg),
        description=meta.get("description", f"{class_name} from {folder}"),
        pixel_latents=bool(meta.get("pixel_latents", False)),
        vae=vae,
        scheduler_config=scheduler,
    )


def _latent_shape(class_name: str, cfg: dict[str, Any]) -> tuple[int, ...]:
    c, s = int(cfg["in_channels"]), int(cfg["sample_size"])
    frames = family_of(class_name).frames_key
    return (c, s, s) if frames is None else (c, int(cfg[frames]), s, s)


def _conditioner(folder: Path, class_name: str, cfg: dict[str, Any], meta: dict[str, Any]) -> Conditioner:
    if family_of(class_name).conditioning == "label":
        return LabelConditioner(list(meta.get("class_names", [])), int(cfg["num_embeds_ada_norm"]))
    if is_caption_encoder(folder / "text_encoder"):
        return CaptionConditioner(CaptionEncoder.load(folder / "text_encoder"))
    return MissingCaptionEncoder(str(folder))


def _full_size(name: str) -> ModelAdapter:
    class_name, config, description = architectures.FULL_SIZE[name]
    log.info("building %s with random weights (no checkpoint can be downloaded here)", name)
    torch.manual_seed(0)
    transformer = architectures.build(class_name, config).eval()
    return ModelAdapter(
        model_id=name,
        class_name=class_name,
        transformer=transformer,
        conditioner=_full_size_conditioner(class_name, config),
        latent_shape=_latent_shape(class_name, config),
        description=f"{description} [random-init]",
        random_init=True,
    )


def _full_size_conditioner(class_name: str, config: dict[str, Any]) -> Conditioner:
    """Class ids (no names), or synthetic caption embeddings: random weights have no text encoder."""
    if family_of(class_name).conditioning == "label":
        return LabelConditioner([], int(config["num_embeds_ada_norm"]))
    return SyntheticCaptionConditioner(architectures.CAPTION_TOKENS_FULL_SIZE, int(config["caption_channels"]))


def _folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*.safetensors"))


def list_models() -> list[ModelInfo]:
    """Built-ins with parameter counts and sizes on disk, then the full-size configs."""
    rows = []
    for name in BUILTINS:
        folder = BUILTIN_DIR / name
        index = read_json(folder / "model_index.json") if (folder / "model_index.json").is_file() else {}
        meta = index.get("qexport", {})
        rows.append(
            ModelInfo(
                name=name,
                class_name=str(index.get("transformer", ["", "?"])[1]),
                parameters=meta.get("parameters"),
                size_bytes=_folder_bytes(folder) if folder.is_dir() else None,
                description=meta.get("description", "weights missing"),
                random_init=False,
            )
        )
    for name, (class_name, config, description) in architectures.FULL_SIZE.items():
        with torch.device("meta"):  # counts parameters without allocating them
            count = sum(p.numel() for p in architectures.build(class_name, config).parameters())
        rows.append(
            ModelInfo(
                name=name,
                class_name=class_name,
                parameters=count,
                size_bytes=None,
                description=description,
                random_init=True,
            )
        )
    return rows
