"""Open an emitted model on Qualcomm's HTP backend through onnxruntime's QNN execution provider
(the ``onnxruntime-qnn`` plugin; on x86-64 it compiles the graph and runs the HTP kernels in
simulation), run it, and read off the graph the backend compiled which quantized linears run as
fixed-point operations. Needs the ``qnn`` extra; leaves the models alone."""

from __future__ import annotations

import json
import re
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
from qexport.targets.profile import TargetProfile

from qexport.errors import QexportError
from qexport.runtime.qnn import available, open_htp

__all__ = ["HtpRun", "Placement", "available", "compiled_kernels", "htp_session", "placement", "run_htp"]


@dataclass(frozen=True, kw_only=True)
class Placement:
    """How many nodes of the optimized graph each execution provider took (QNN counts partitions)."""

    qnn: int
    cpu: int
    cpu_ops: dict[str, int]


# QNN data types (QnnTypes.h): the high byte is the class, 3 = signed and 4 = unsigned fixed point
FIXED_POINT_CLASSES = (3, 4)


@dataclass(kw_only=True)
class HtpRun:
    """One model on the HTP backend (CPU fallback off): its output, the quantized layers the backend
    compiled as fixed-point operations (integer) or not (float_), and the time to open and to run."""

    output: np.ndarray
    integer: list[str] = field(default_factory=list)
    float_: list[str] = field(default_factory=list)
    ops: dict[str, int] = field(default_factory=dict)  # QNN op type -> count in the compiled graph
    open_seconds: float = 0.0
    run_seconds: float = 0.0


def htp_session(
    path: Path, target: TargetProfile, fallback: bool = False, graph_dir: Path | None = None
) -> ort.InferenceSession:
    """An onnxruntime session of `path` on the HTP backend, FP16 enabled for the SoC the target
    records; with fallback off any node the backend refuses is an error. graph_dir, if given,
    receives the QNN graph the backend compiled, as JSON.

    Raises:
        QexportError: onnxruntime-qnn is not installed, or the backend refused a node.
    """
    dump = {} if graph_dir is None else {"dump_json_qnn_graph": "1", "json_qnn_graph_dir": str(graph_dir)}
    return open_htp(path, target.fp16_soc, fallback, settings=dump)


def compiled_kernels(graph: dict[str, Any], layers: list[str], ids: dict[str, str]) -> tuple[list[str], list[str]]:
    """Split the quantized layers by what the backend compiled them to: a layer is integer when the
    QNN node reading its weight (``L<i>:w_q``, possibly transposed) takes a fixed-point activation
    and a fixed-point weight; anything else (a float node, or no node found) is float.

    Args:
        graph: the QNN graph JSON the EP dumped (``dump_json_qnn_graph``).
    """
    nodes, tensors = graph["graph"]["nodes"], graph["graph"]["tensors"]

    def fixed(name: str) -> bool:
        return (int(tensors[name]["data_type"]) >> 8) in FIXED_POINT_CLASSES

    reader: dict[str, dict[str, Any]] = {}
    for node in nodes.values():
        for name in node["input_names"]:
            if ":w_q" in name:
                reader[name.split(":w_q")[0]] = node
    integer: list[str] = []
    float_: list[str] = []
    for layer in layers:
        node = reader.get(ids[layer])
        ok = node is not None and len(node["input_names"]) >= 2 and all(fixed(n) for n in node["input_names"][:2])
        (integer if ok else float_).append(layer)
    return integer, float_


def run_htp(
    path: Path, feeds: dict[str, np.ndarray], layers: list[str], ids: dict[str, str], target: TargetProfile
) -> HtpRun:
    """Compile `path` for HTP with CPU fallback off, run it once on `feeds`, and classify the
    quantized layers from the graph the backend compiled.

    Raises:
        QexportError: onnxruntime-qnn is missing, the backend refused a node, or it dumped no graph.
    """
    with tempfile.TemporaryDirectory(prefix="qexport-qnn-") as tmp:
        start = time.perf_counter()
        session = htp_session(path, target, graph_dir=Path(tmp))
        opened = time.perf_counter() - start
        dumps = [p for p in Path(tmp).glob("*.json") if not p.name.endswith("_tensor_log.json")]
        if len(dumps) != 1:
            raise QexportError(f"{path.name}: the QNN EP dumped {len(dumps)} graphs, expected one partition")
        graph = json.loads(dumps[0].read_text())
    names = {i.name for i in session.get_inputs()}
    start = time.perf_counter()
    output = session.run(None, {k: v for k, v in feeds.items() if k in names})[0]
    ran = time.perf_counter() - start
    integer, float_ = compiled_kernels(graph, layers, ids)
    ops: dict[str, int] = {}
    for node in graph["graph"]["nodes"].values():
        ops[node["type"]] = ops.get(node["type"], 0) + 1
    return HtpRun(output=np.asarray(output), integer=integer, float_=float_, ops=ops, open_seconds=opened,
                  run_seconds=ran)  # fmt: skip


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
