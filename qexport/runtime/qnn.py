"""Sessions on Qualcomm's HTP backend through onnxruntime's QNN execution provider (the
``onnxruntime-qnn`` plugin, the ``qnn`` extra; on x86-64 the backend compiles for the SoC named and
runs the HTP kernels in simulation). numpy + onnxruntime only, as the rest of the edge loop."""

from __future__ import annotations

import importlib
import importlib.util
from pathlib import Path
from typing import Any

import onnxruntime as ort

from qexport.errors import QexportError
from qexport.runtime.files import inside, model_path

_registered: list[str] = []


def available() -> bool:
    """Whether onnxruntime-qnn is installed."""
    return importlib.util.find_spec("onnxruntime_qnn") is not None


def _plugin() -> Any:
    if not available():
        raise QexportError("onnxruntime-qnn is not installed; pip install 'qexport[qnn]'")
    oq = importlib.import_module("onnxruntime_qnn")  # an optional extra, untyped
    name = oq.get_ep_name()
    if name not in _registered:
        ort.register_execution_provider_library(name, oq.get_library_path())
        _registered.append(name)
    return oq


def open_htp(
    path: Path,
    soc: dict[str, str],
    fallback: bool = False,
    settings: dict[str, str] | None = None,
    config: dict[str, str] | None = None,
) -> ort.InferenceSession:
    """A session of `path` on the HTP backend with FP16 float ops for the SoC named by `soc`
    (soc_model, htp_arch; empty: the backend's default SoC, integer ops only); with fallback off any
    node the backend refuses is an error.

    Args:
        settings: more QNN provider options (e.g. dump_json_qnn_graph).
        config: more session configuration entries (e.g. ep.context_enable).

    Raises:
        QexportError: onnxruntime-qnn is not installed, or the backend refused the model.
    """
    oq = _plugin()
    devices = [d for d in ort.get_ep_devices() if d.ep_name == oq.get_ep_name()]
    options = ort.SessionOptions()
    options.log_severity_level = 3  # the EP's warnings about Windows-only features are noise here
    if not fallback:
        options.add_session_config_entry("session.disable_cpu_ep_fallback", "1")
    for key, value in (config or {}).items():
        options.add_session_config_entry(key, value)
    provider = {"backend_path": oq.get_qnn_htp_path(), **soc, **(settings or {})}
    if soc:
        provider["enable_htp_fp16_precision"] = "1"
    options.add_provider_for_devices(devices, provider)
    try:
        return ort.InferenceSession(str(path), options)
    except Exception as exc:  # onnxruntime raises its own exception types
        raise QexportError(f"{Path(path).name} does not run on the HTP backend with CPU fallback off: {exc}") from exc


def soc_of(manifest: dict[str, Any]) -> dict[str, str]:
    """The SoC a build assumes (its manifest's target_device), as QNN provider options."""
    device = manifest.get("target_device") or {}
    return {k: str(device[k]) for k in ("soc_model", "htp_arch") if k in device}


def model_opener(folder: Path, manifest: dict[str, Any]) -> Any:
    """How the edge loop opens a step model on HTP: from its context binary when the build has them
    (``qexport contexts``), else by compiling the ONNX model at load. The path it is given is a
    checked one (files.model_path); a context model is checked the same way before it opens.

    Raises:
        QexportError: contexts whose load check failed on this machine (the reason recorded).
    """
    soc = soc_of(manifest)
    contexts = manifest.get("contexts")
    if not contexts:
        return lambda path: open_htp(path, soc)
    if contexts.get("loaded") is not True:
        raise QexportError(f"{folder}'s {contexts['mode']} context binaries did not load here ({contexts['loaded']}); "
                           "compile per-model ones: qexport contexts FOLDER --mode per-model --force")  # fmt: skip
    by_model = {inside(folder, r["model"]): ctx for r, ctx in zip(manifest["ranges"], contexts["models"], strict=True)}
    config = {"ep.share_ep_contexts": "1"} if contexts["mode"] == "shared" else {}
    return lambda path: open_htp(model_path(folder, by_model[Path(path).resolve()]), soc, config=config)
