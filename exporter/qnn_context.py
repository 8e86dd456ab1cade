"""QNN context binaries of a qnn-htp build: each step / range model compiled ahead of time for the
HTP backend (onnxruntime's EPContext format, embed mode 0), so an app loads a ready graph in a
fraction of a second instead of compiling it. Two layouts:

- ``per-model``: one ``<model>_ctx.onnx`` + ``<model>_ctx_qnn.bin`` per step model;
- ``shared``: every step model compiled into one context binary (``ep.share_ep_contexts``; the
  last with ``ep.stop_share_ep_contexts``), each ``<model>_ctx.onnx`` naming its graph in it, the
  weights the graphs share stored once.

After compiling, every context is loaded back in a child process (a backend that crashes loading
it is a clean failure, not a dead qexport) and run on the same inputs as the session that
compiled it; the outputs must be equal. The result goes to the manifest's ``contexts`` entry."""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
from qexport.targets.catalog import get_profile

from qexport.errors import QexportError
from qexport.media import written_whole
from qexport.runtime.files import model_path
from qexport.runtime.qnn import open_htp, soc_of

MODES = ("per-model", "shared")
FOLDER = "context"


def _feeds(session: ort.InferenceSession, seed: int) -> dict[str, np.ndarray]:
    """Seeded random inputs of the session's static shapes (float: standard normal)."""
    rng = np.random.default_rng(seed)
    feeds = {}
    for i in session.get_inputs():
        if i.type == "tensor(float)":
            feeds[i.name] = rng.standard_normal(i.shape).astype(np.float32)
        elif i.type == "tensor(int64)":
            feeds[i.name] = np.full(i.shape, 500, dtype=np.int64)
        else:
            raise QexportError(f"input {i.name} of type {i.type}: no test input for the context check")
    return feeds


def compile_contexts(folder: Path, manifest: dict[str, Any], mode: str) -> dict[str, Any]:
    """Compile the build's step models into context binaries under folder/context (whole or not at
    all), load each back in a child process and compare its output with the compiling session's.

    Returns:
        The manifest's ``contexts`` entry: mode, the context model of each range, the binaries and
        their bytes, and the load check (``loaded``: true, or the reason it failed).

    Raises:
        QexportError: an unknown mode, a build not for qnn-htp, or a model the backend refuses.
    """
    if mode not in MODES:
        raise QexportError(f"context mode must be one of {', '.join(MODES)}; got {mode!r}")
    get_profile(str(manifest.get("target"))).check_htp()
    soc = soc_of(manifest)
    models = [str(r["model"]) for r in manifest["ranges"]]
    out = folder / FOLDER
    if out.exists():
        raise QexportError(f"{out} exists; remove it to compile the contexts again")
    with written_whole(out) as tmp, tempfile.TemporaryDirectory(prefix="qexport-ctx-") as scratch:
        reference: dict[str, np.ndarray] = {}
        for i, model in enumerate(models):
            config = {"ep.context_enable": "1", "ep.context_embed_mode": "0",
                      "ep.context_file_path": str(tmp / f"{Path(model).stem}_ctx.onnx")}  # fmt: skip
            if mode == "shared":
                config["ep.share_ep_contexts"] = "1"
                if i == len(models) - 1:
                    config["ep.stop_share_ep_contexts"] = "1"
            session = open_htp(model_path(folder, model), soc, config=config)
            feeds = _feeds(session, i)
            np.savez(Path(scratch) / f"{i}.npz", **feeds)  # type: ignore[arg-type]  # numpy stubs type **kwds as bool
            reference[model] = np.asarray(session.run(None, feeds)[0])
            del session
        check = _load_check(tmp, models, soc, mode, Path(scratch))
        for model, got in check.pop("outputs", {}).items():
            diff = float(np.abs(np.asarray(got) - reference[model]).max())
            check.setdefault("max_abs_diff", {})[model] = diff
        binaries = sorted(p.name for p in tmp.glob("*.bin"))
        entry = {
            "mode": mode,
            "folder": FOLDER,
            "models": [f"{FOLDER}/{Path(m).stem}_ctx.onnx" for m in models],
            "binaries": {b: (tmp / b).stat().st_size for b in binaries},
            "sdk": _sdk(tmp / f"{Path(models[0]).stem}_ctx.onnx"),
            **check,
        }
    return entry


def _sdk(ctx_model: Path) -> str:
    import onnx

    node = onnx.load(str(ctx_model)).graph.node[0]
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
    version = attrs.get("ep_sdk_version", b"")
    return version.decode() if isinstance(version, bytes) else str(version)


def _load_check(folder: Path, models: list[str], soc: dict[str, str], mode: str, scratch: Path) -> dict[str, Any]:
    """Load every context model in a child process and run it on the saved inputs."""
    job = {"folder": str(folder), "models": [f"{Path(m).stem}_ctx.onnx" for m in models], "soc": soc,
           "shared": mode == "shared", "scratch": str(scratch)}  # fmt: skip
    done = subprocess.run([sys.executable, "-m", "qexport.exporter.qnn_context", json.dumps(job)],
                          capture_output=True, text=True, timeout=3600)  # fmt: skip
    if done.returncode != 0:
        tail = (done.stderr.strip().splitlines() or ["no message"])[-1]
        how = f"signal {-done.returncode}" if done.returncode < 0 else f"exit {done.returncode}"
        return {"loaded": f"the HTP backend failed loading the contexts ({how}): {tail}"}
    outputs = {m: np.load(scratch / f"out{i}.npy") for i, m in enumerate(models)}
    return {"loaded": True, "outputs": outputs}


def _child(job: dict[str, Any]) -> None:
    """The child process: open each context model on HTP, run it on its saved inputs."""
    folder, scratch = Path(job["folder"]), Path(job["scratch"])
    config = {"ep.share_ep_contexts": "1"} if job["shared"] else {}
    for i, name in enumerate(job["models"]):
        session = open_htp(folder / name, job["soc"], config=config)
        feeds = dict(np.load(scratch / f"{i}.npz"))
        np.save(scratch / f"out{i}.npy", session.run(None, feeds)[0])


if __name__ == "__main__":
    _child(json.loads(sys.argv[1]))
