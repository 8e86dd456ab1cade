"""manifest.json: everything an edge app needs to run the emitted models (numpy + json only)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from qexport.errors import QexportError

# 1: steps carry the affine DDIM step (c_x, c_out); 2: 1 + `kv` (K/V precompute builds; a schema-1
# reader would feed `cond`); 3: the `scheduler` block (coefficients over the samples and model
# outputs so far, noise, input scaling) replaces c_x / c_out (a schema-2 reader would miss it).
SCHEMA_VERSION = 3  # what a build writes
READABLE_SCHEMA = 3
MANIFEST = "manifest.json"


def read_manifest(folder: Path) -> dict[str, Any]:
    """Load and check a build's manifest.

    Raises:
        QexportError: missing or unreadable manifest, a newer schema, a missing model file.
    """
    path = Path(folder) / MANIFEST
    if not path.is_file():
        raise QexportError(f"{folder} has no {MANIFEST}; point at a folder written by qexport build")
    try:
        manifest = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise QexportError(f"cannot read {path}: {exc}") from exc
    version = manifest.get("schema_version")
    if not isinstance(version, int) or version > READABLE_SCHEMA:
        raise QexportError(
            f"{path} has manifest schema {version}; this qexport reads schema <= {READABLE_SCHEMA}: upgrade qexport"
        )
    parts = [*manifest.get("ranges", []), *([manifest["kv"]] if manifest.get("kv") else [])]
    if pipeline := manifest.get("pipeline"):  # a pipeline build: its text, transformer and VAE parts
        parts += [{"model": pipeline["denoiser"]}] if pipeline.get("denoiser") else []  # else ranges' models
        parts += [*pipeline["text"], *([pipeline["vae"]] if pipeline["vae"] else [])]
        parts += [{"model": t["tokenizer"]} for t in pipeline["text"]]
    for r in parts:
        if not (Path(folder) / r["model"]).is_file():
            raise QexportError(f"model file {r['model']} named in {path} is missing; rebuild the folder")
    return manifest
