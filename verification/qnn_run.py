"""Open an emitted model on Qualcomm's HTP backend through onnxruntime's QNN execution provider
(the ``onnxruntime-qnn`` plugin; on x86-64 it compiles the graph and runs the HTP kernels in
simulation). Needs the ``qnn`` extra; leaves the models alone."""

from __future__ import annotations

import importlib
import importlib.util
import re
from dataclasses import dataclass
from pathlib import Path

import onnxruntime as ort
from qexport.targets.profile import TargetProfile

from qexport.errors import QexportError

_registered: list[str] = []


def available() -> bool:
    """Whether onnxruntime-qnn is installed."""
    return importlib.util.find_spec("onnxruntime_qnn") is not None


@dataclass(frozen=True, kw_only=True)
class Placement:
    """How many nodes of the optimized graph each execution provider took (QNN counts partitions)."""

    qnn: int
    cpu: int
    cpu_ops: dict[str, int]


def htp_session(path: Path, target: TargetProfile, fallback: bool = False) -> ort.InferenceSession:
    """An onnxruntime session of `path` on the HTP backend, FP16 enabled for the SoC the target
    records; with fallback off any node the backend refuses is an error.

    Raises:
        QexportError: onnxruntime-qnn is not installed, or the backend refused a node.
    """
    if not available():
        raise QexportError("onnxruntime-qnn is not installed; pip install 'qexport[qnn]'")
    oq = importlib.import_module("onnxruntime_qnn")  # an optional extra, untyped
    name = oq.get_ep_name()
    if name not in _registered:
        ort.register_execution_provider_library(name, oq.get_library_path())
        _registered.append(name)
    devices = [d for d in ort.get_ep_devices() if d.ep_name == name]
    options = ort.SessionOptions()
    if not fallback:
        options.add_session_config_entry("session.disable_cpu_ep_fallback", "1")
    settings = {"backend_path": oq.get_qnn_htp_path(), **target.fp16_soc}
    if target.fp16_soc:
        settings["enable_htp_fp16_precision"] = "1"
    options.add_provider_for_devices(devices, settings)
    try:
        return ort.InferenceSession(str(path), options)
    except Exception as exc:  # onnxruntime raises its own exception types
        raise QexportError(f"{path.name} does not run on the HTP backend with CPU fallback off: {exc}") from exc


def placement(log: str) -> Placement:
    """Node placement from a session log written at log_severity_level 0 ("Node placements")."""
    counts: dict[str, int] = {}
    cpu_ops: dict[str, int] = {}
    provider = ""
    for line in log.splitlines():
        found = re.search(r"Node\(s\) placed on \[(\w+)\]\. Number of nodes: (\d+)", line)
        if found:
            provider = found.group(1)
            counts[provider] = int(found.group(2))
            continue
        op = re.search(r"VerifyEachNodeIsAssignedToAnEp\]\s{3}(\w+) \(", line)
        if op and provider == "CPUExecutionProvider":
            cpu_ops[op.group(1)] = cpu_ops.get(op.group(1), 0) + 1
    return Placement(qnn=counts.get("QNNExecutionProvider", 0), cpu=counts.get("CPUExecutionProvider", 0),
                     cpu_ops=cpu_ops)  # fmt: skip
