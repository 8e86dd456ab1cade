"""manifest.json read as untrusted input: bounded strict JSON (qexport.schema), a schema this
qexport reads, sealed by the digest of its own content, checked against runtime.manifest_schema,
and every file of the folder it records present, inside the folder, of the size and sha256 it
recorded, before anything uses it. Writing (and sealing) is exporter.manifest.write_manifest."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

from qexport.errors import QexportError
from qexport.runtime.files import MANIFEST, REBUILD, inside
from qexport.runtime.manifest_schema import MAX_MANIFEST_BYTES, SCHEMA, Manifest, named_files, problem
from qexport.schema import canonical, read_json, sha256_file, validate

# 1: steps carry the affine DDIM step (c_x, c_out); 2: 1 + `kv` (K/V precompute builds; a schema-1
# reader would feed `cond`); 3: the `scheduler` block (coefficients over the samples and model
# outputs so far, noise, input scaling) replaces c_x / c_out (a schema-2 reader would miss it);
# 4: sealed (`digest`), every file's size and sha256 (`integrity`), the schema of manifest_schema.
SCHEMA_VERSION = SCHEMA  # what a build writes
READABLE_SCHEMA = SCHEMA  # and the one schema this qexport reads
DIGEST = "digest"
_verified: dict[tuple[Any, ...], str] = {}  # a file's identity (path, inode, size, times) -> its sha256


def manifest_digest(data: dict[str, Any]) -> str:
    """The seal: sha256 of the canonical JSON (qexport.schema.canonical) of everything but `digest`."""
    return hashlib.sha256(canonical({k: v for k, v in data.items() if k != DIGEST})).hexdigest()


def file_digest(path: Path) -> str:
    """A file's sha256, streamed; remembered for this process while its inode, size and times stay."""
    st = os.stat(path)
    key = (str(path), st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
    if key not in _verified:
        _verified[key] = sha256_file(path)
    return _verified[key]


def read_manifest(folder: Path) -> dict[str, Any]:
    """Load a build's manifest and check it whole: its schema version, its seal, its schema and the
    consistency of its entries, and every file of the folder it records (inside it, size, sha256).

    Returns:
        The manifest as parsed (plain JSON data, checked).

    Raises:
        QexportError: one line naming the file and what is wrong (and the field, for a schema error).
    """
    folder = Path(folder)
    path = folder / MANIFEST
    if not path.is_file():
        raise QexportError(f"{folder} has no {MANIFEST}; point at a folder written by qexport build")
    inside(folder, MANIFEST, str(folder))
    data = read_json(path, str(path), REBUILD, MAX_MANIFEST_BYTES)
    manifest = check_content(data, str(path))
    check_files(folder, manifest, str(path))
    return data


def check_content(data: Any, source: str) -> Manifest:
    """The checks of a manifest's content alone (no file is read): schema version, seal, schema,
    consistency, every file it names among the files it records.

    Raises:
        QexportError: the first failing check, naming `source`.
    """
    version = data.get("schema_version") if isinstance(data, dict) else None
    if not isinstance(data, dict) or type(version) is not int:
        raise QexportError(f"{source} has no schema_version this qexport knows (got {str(version)[:40]!r}); {REBUILD}")
    if version > READABLE_SCHEMA:
        raise QexportError(
            f"{source} has manifest schema {version}; this qexport reads schema {READABLE_SCHEMA}: upgrade qexport"
        )
    if version < READABLE_SCHEMA:
        raise QexportError(
            f"{source} has manifest schema {version}, which this qexport no longer reads (it reads schema "
            f"{READABLE_SCHEMA}, sealed with the digests of its files); rebuild with this qexport"
        )
    if not isinstance(data.get(DIGEST), str):
        raise QexportError(f"{source} carries no digest of its content; rebuild with this qexport")
    try:
        digest = manifest_digest(data)
    except UnicodeEncodeError:  # a "\ud800" escape parses to a string no UTF-8 can hold
        raise QexportError(f"{source} holds text that is not valid Unicode (a lone surrogate); {REBUILD}") from None
    if data[DIGEST] != digest:
        raise QexportError(f"{source} was changed after qexport wrote it: its content does not match its digest; "
                           f"{REBUILD}")  # fmt: skip
    manifest = validate(Manifest, data, source, REBUILD)
    if (why := problem(manifest)) is not None:
        raise QexportError(f"{source}: {why}; {REBUILD}")
    recorded = manifest.integrity.files
    for name in named_files(manifest.model_copy(update={"integrity": None})):
        if name not in recorded:
            raise QexportError(f"{name} named in {source} is not among the files its integrity record covers; "
                               f"{REBUILD}")  # fmt: skip
    return manifest


def check_files(folder: Path, manifest: Manifest, source: str) -> None:
    """Every file the manifest records: inside the folder, and of the size and sha256 recorded.

    Raises:
        QexportError: the first file missing, outside, cut or changed.
    """
    for name, record in manifest.integrity.files.items():
        path = inside(folder, name, source)
        size = path.stat().st_size
        if size != record.bytes:
            raise QexportError(f"{name} in {folder} is {size} bytes; {source} records {record.bytes}: the file was "
                               f"changed after the build; {REBUILD}")  # fmt: skip
        if file_digest(path) != record.sha256:
            raise QexportError(f"{name} in {folder} does not match the sha256 {source} records for it: the file "
                               f"was changed after the build; {REBUILD}")  # fmt: skip
