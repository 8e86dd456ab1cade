"""The schema of legality.json (one LegalityReport.to_json per emitted model, nodes included) and
its reader: bounded strict JSON checked by pydantic (qexport.schema), one QexportError line on
anything else. The build writes the file; its manifest records the file's size and sha256."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import ConfigDict, Field, RootModel

from qexport.schema import Strict, read_json, validate

MAX_LEGALITY_BYTES = 256 << 20  # ~150 bytes a node: a million nodes over all models
MAX_NODES = 1 << 20
Status = Literal["quantized", "float", "unsupported", "qdq"]
Name = Annotated[str, Field(max_length=1024)]
Macs = Annotated[int, Field(ge=0, le=1 << 62)]


class NodeRecord(Strict):
    node: Name
    op: Annotated[str, Field(min_length=1, max_length=128)]
    status: Status
    macs: Macs = 0
    reason: Annotated[str, Field(max_length=4096)] = ""
    role: Literal["", "attention"] = ""


class Totals(Strict):
    quantized: Macs
    float: Macs
    unsupported: Macs
    qdq: Macs


class Attention(Strict):
    matmuls: Macs
    quantized: Macs
    macs: Macs
    quantized_macs: Macs


class ModelRecord(Strict):
    """One model's report; `nodes` is absent in the manifest's summary of it."""

    target: Annotated[str, Field(min_length=1, max_length=64)]
    model: Name
    totals: Totals
    macs: Macs
    quantized_mac_share: Annotated[float, Field(ge=0.0, le=1.0)]
    attention: Attention
    unsupported: Annotated[list[Annotated[str, Field(max_length=128)]], Field(max_length=4096)]
    violations: Annotated[list[Annotated[str, Field(max_length=4096)]], Field(max_length=MAX_NODES)]
    nodes: Annotated[list[NodeRecord], Field(max_length=MAX_NODES)] | None = None


class LegalityFile(RootModel[Annotated[list[ModelRecord], Field(max_length=100_000)]]):
    """legality.json: the reports of every emitted model, in emission order."""

    model_config = ConfigDict(strict=True)


def read_legality(path: Path) -> list[dict[str, Any]]:
    """Load and check a build's legality.json.

    Returns:
        The reports as parsed (plain JSON data, checked): one dict per model.

    Raises:
        QexportError: a missing, oversized, malformed file, or one its schema refuses (naming the field).
    """
    fix = "rebuild the folder with qexport build"
    data = read_json(Path(path), str(path), fix, MAX_LEGALITY_BYTES)
    validate(LegalityFile, data, str(path), fix)
    return list(data)
