"""Which layers calibration hooks: every nn.Linear in the transformer blocks by default, minus
the layers the paper keeps in FP (patch embedding, timestep/caption embedders, modulation, final
layer); include/exclude by fnmatch name pattern."""

from __future__ import annotations

from dataclasses import dataclass
from fnmatch import fnmatchcase

from torch import nn

from qexport.errors import QexportError

DEFAULT_INCLUDE = ("*transformer_blocks.*",)
# Conditioning paths (t, class, caption) and the final layer stay FP, as in ViDiT-Q and the paper.
DEFAULT_EXCLUDE = ("*norm*", "*emb*", "adaln_single*", "caption_projection*", "proj_out*", "pos_embed*")


@dataclass(frozen=True, kw_only=True)
class LayerSelection:
    """Name patterns (fnmatch) for the layers to calibrate.

    include / exclude are the user's (each must match some linear); keep_fp are the default
    FP layers, excluded wherever they exist.
    """

    include: tuple[str, ...] = DEFAULT_INCLUDE
    exclude: tuple[str, ...] = ()
    keep_fp: tuple[str, ...] = DEFAULT_EXCLUDE


@dataclass(frozen=True, kw_only=True)
class SelectedLayers:
    layers: dict[str, nn.Linear]
    excluded: list[str]  # linears left in FP, by name


def select_layers(model: nn.Module, selection: LayerSelection) -> SelectedLayers:
    """Pick the nn.Linear layers whose names match an include and no exclude pattern.

    Raises:
        QexportError: a pattern matches no linear layer, or nothing is selected.
    """
    linears = {name: m for name, m in model.named_modules() if isinstance(m, nn.Linear)}
    for pattern in (*selection.include, *selection.exclude):
        if not any(fnmatchcase(name, pattern) for name in linears):
            examples = ", ".join(list(linears)[:4])
            raise QexportError(f"layer pattern {pattern!r} matches no linear layer (names look like: {examples}, ...)")
    chosen, excluded = {}, []
    for name, module in linears.items():
        wanted = any(fnmatchcase(name, p) for p in selection.include)
        if wanted and not any(fnmatchcase(name, p) for p in (*selection.exclude, *selection.keep_fp)):
            chosen[name] = module
        else:
            excluded.append(name)
    if not chosen:
        raise QexportError("the include/exclude patterns leave no layer to calibrate")
    return SelectedLayers(layers=chosen, excluded=excluded)
