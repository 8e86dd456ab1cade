"""Whether a build may be run: a quantized build's manifest records a verification that passed. A
build whose verification was skipped, interrupted or failed runs only when the user says so."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from qexport.errors import QexportError


def unverified(folder: Path, manifest: dict[str, Any]) -> str | None:
    """None for a verified build (or an FP export, which has nothing quantized to verify), else why
    it is not: "<folder> was never verified (...)" or "<folder> failed verification"."""
    if "quantization" not in manifest:
        return None  # an FP export (qexport export-fp)
    v = manifest.get("verification")
    if isinstance(v, dict) and v.get("ok") is True:
        return None
    if v is None:
        return f"{folder} was never verified (built with --no-verify, or its verification was interrupted)"
    return f"{folder} failed verification (its manifest's verification entry says why)"


def check_verified(folder: Path, manifest: dict[str, Any], allow_unverified: bool) -> str | None:
    """Refuse a build that was never verified or failed verification, unless allow_unverified.

    Returns:
        None for a verified build, else the warning to show when allow_unverified lets it run.

    Raises:
        QexportError: unverified or failed, and allow_unverified not given.
    """
    why = unverified(folder, manifest)
    if why is None:
        return None
    if not allow_unverified:
        fix = f"run qexport verify {folder} first" if "never" in why else "rebuild it"
        raise QexportError(f"{why}; {fix}, or pass --allow-unverified to run it anyway")
    return f"warning: {why.split(' (')[0]}; running it because --allow-unverified was given"
