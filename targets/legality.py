"""Check an emitted QDQ graph against a target profile (numpy + onnx only): every node is
quantized, float or unsupported on the target, with its MACs; a broken rule (storage type,
symmetry, zero point, granularity, power-of-two scale, opset, static shapes) is a violation
naming node, tensor and rule. Leaves the graph alone."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import onnx
from onnx import numpy_helper
from qexport.targets.profile import TargetProfile

TYPE_NAMES: dict[int, str] = {
    onnx.TensorProto.INT4: "int4",
    onnx.TensorProto.UINT4: "uint4",
    onnx.TensorProto.INT8: "int8",
    onnx.TensorProto.UINT8: "uint8",
    onnx.TensorProto.INT16: "int16",
    onnx.TensorProto.UINT16: "uint16",
    onnx.TensorProto.INT32: "int32",
}
QDQ = ("QuantizeLinear", "DequantizeLinear")


@dataclass(frozen=True, kw_only=True)
class NodeReport:
    node: str
    op: str
    status: str  # "quantized", "float", "unsupported" (reads quantized inputs the target cannot run), "qdq"
    macs: int = 0
    reason: str = ""
    role: str = ""  # "attention": a MatMul of two activations (QK^T, PV), else ""


@dataclass(frozen=True, kw_only=True)
class Violation:
    node: str
    tensor: str
    rule: str
    detail: str

    def __str__(self) -> str:
        return f"node {self.node!r}, tensor {self.tensor!r}: rule '{self.rule}' broken: {self.detail}"


@dataclass(kw_only=True)
class LegalityReport:
    target: str
    model: str
    nodes: list[NodeReport] = field(default_factory=list)
    violations: list[Violation] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.violations

    def totals(self) -> dict[str, int]:
        out = {"quantized": 0, "float": 0, "unsupported": 0, "qdq": 0}
        for n in self.nodes:
            out[n.status] += 1
        return out

    def attention(self) -> dict[str, int]:
        """The attention matmuls (MatMuls of two activations): how many, how many quantized, their MACs."""
        nodes = [n for n in self.nodes if n.role == "attention"]
        quantized = [n for n in nodes if n.status == "quantized"]
        return {"matmuls": len(nodes), "quantized": len(quantized), "macs": sum(n.macs for n in nodes),
                "quantized_macs": sum(n.macs for n in quantized)}  # fmt: skip

    def quantized_mac_share(self) -> float:
        total = sum(n.macs for n in self.nodes)
        return sum(n.macs for n in self.nodes if n.status == "quantized") / total if total else 0.0

    def to_json(self, nodes: bool = True) -> dict[str, Any]:
        out: dict[str, Any] = {
            "target": self.target,
            "model": self.model,
            "totals": self.totals(),
            "macs": sum(n.macs for n in self.nodes),
            "quantized_mac_share": self.quantized_mac_share(),
            "attention": self.attention(),
            "unsupported": sorted({n.op for n in self.nodes if n.status == "unsupported"}),
            "violations": [str(v) for v in self.violations],
        }
        if nodes:
            out["nodes"] = [asdict(n) for n in self.nodes]
        return out


def node_label(node: onnx.NodeProto, index: int) -> str:
    """A node's name, or (emitted files drop names) its op, position and first output."""
    return node.name or f"{node.op_type}#{index}:{node.output[0] if node.output else ''}"


def check_model(model: onnx.ModelProto, target: TargetProfile, name: str = "") -> LegalityReport:
    """Walk the graph: classify every node and check every rule of the target.

    Args:
        model: the emitted model, initializers loaded (scales and zero points are read).
        target: the profile to check against.
        name: the model's file name, for the report.
    """
    report = LegalityReport(target=target.name, model=name)
    graph = model.graph
    inits = {i.name: i for i in graph.initializer}
    producer = {o: n for n in graph.node for o in n.output}
    users: dict[str, list[onnx.NodeProto]] = {}
    for n in graph.node:
        for t in n.input:
            users.setdefault(t, []).append(n)
    shapes = _shapes(model)
    report.violations += _model_rules(model, target)
    report.violations += emission_rules(model, target, shapes)
    report.violations += integer_only_rules(model, target)
    for index, node in enumerate(graph.node):
        label = node_label(node, index)
        if node.op_type in QDQ:
            report.nodes.append(NodeReport(node=label, op=node.op_type, status="qdq"))
            report.violations += _qdq_rules(node, label, inits, producer, target, users)
            continue
        dq = [t for t in node.input if t in producer and producer[t].op_type == "DequantizeLinear"]
        status, reason = "float", ""
        if node.op_type == "MatMulInteger":
            status = "quantized"  # an explicit integer product (run-time quantized input, passes.techniques.dynamic)
        elif dq and target.integer_activations:
            status = "quantized"  # an integer-only unit (integer_only_rules name any float tensor it touches)
        elif dq and target.closed_linears and not any(producer[t].input[0] in inits for t in dq):
            reason = "reads dequantized activations and runs as float"  # a float island after a closed unit
        elif dq and node.op_type not in target.quantized_ops:
            status, reason = "unsupported", f"{target.name} does not run {node.op_type} on integer inputs"
        elif dq and node.op_type in target.quantized_ops:
            data = [t for t in node.input[:2] if t]  # MatMul/Gemm/Conv: the two multiplied operands
            if all(t in dq for t in data):
                status = "quantized"
            else:
                reason = "only some operands are quantized"
        role = "attention" if _activation_matmul(node, inits, producer) else ""
        macs = _macs(node, shapes)
        report.nodes.append(NodeReport(node=label, op=node.op_type, status=status, macs=macs, reason=reason, role=role))
    return report


def emission_rules(model: onnx.ModelProto, target: TargetProfile, shapes: dict[str, list[int]]) -> list[Violation]:
    """The rules of how a target's backend takes the graph apart (closed QDQ units, tensor rank,
    Einsum inputs, LayerNorm scale type); none for a target that sets none of them."""
    graph = model.graph
    inits = {i.name for i in graph.initializer}
    types = {i.name: i.data_type for i in graph.initializer}
    producer = {o: n for n in graph.node for o in n.output}
    users: dict[str, list[onnx.NodeProto]] = {}
    for n in graph.node:
        for t in n.input:
            users.setdefault(t, []).append(n)
    found = []
    for index, node in enumerate(graph.node):
        label = node_label(node, index)

        def bad(tensor: str, rule: str, detail: str, label: str = label) -> None:
            found.append(Violation(node=label, tensor=tensor, rule=rule, detail=detail))

        if target.closed_linears and node.op_type in target.quantized_ops:
            detail = _open_unit(node, producer, users, types)
            if detail:
                bad(node.output[0], "closed unit", detail)
        if target.max_rank is not None:
            for t in node.output:
                if len(shapes.get(t, [])) > target.max_rank:
                    bad(t, "rank", f"rank {len(shapes[t])} tensor; {target.name} takes rank <= {target.max_rank}")
        if not target.single_input_einsum and node.op_type == "Einsum" and len(node.input) < 2:
            bad(node.input[0], "Einsum inputs", f"{target.name} runs Einsum with two or more inputs; emit a Transpose")
        if target.unsigned_norm_gamma and node.op_type == "LayerNormalization" and len(node.input) > 1:
            source = producer.get(node.input[1])
            if source is not None and source.op_type == "DequantizeLinear" and source.input[0] in inits:
                storage = TYPE_NAMES.get(types[source.input[0]], "other")
                if not storage.startswith("uint"):
                    bad(node.input[1], "LayerNorm scale", f"stored as {storage}; {target.name} takes an unsigned scale")
    return found


def integer_only_rules(model: onnx.ModelProto, target: TargetProfile) -> list[Violation]:
    """For an integer-only target: every float tensor a compute node reads comes from a
    DequantizeLinear, and every float tensor it writes goes only to QuantizeLinear (none for other
    targets)."""
    if not target.integer_activations:
        return []
    graph = model.graph
    floats = _float_tensors(model)
    producer = {o: n for n in graph.node for o in n.output}
    users: dict[str, list[onnx.NodeProto]] = {}
    for n in graph.node:
        for t in n.input:
            users.setdefault(t, []).append(n)
    outputs = {o.name for o in graph.output}
    found = []
    for index, node in enumerate(graph.node):
        if node.op_type in QDQ:
            continue
        label = node_label(node, index)
        for t in node.input:
            source = producer.get(t)
            if t in floats and (source is None or source.op_type != "DequantizeLinear"):
                what = "a float constant" if source is None and t not in {i.name for i in graph.input} else "float"
                found.append(Violation(node=label, tensor=t, rule="integer-only", detail=f"reads {what} tensor "
                                       f"{t!r} not dequantized; {target.name} runs no float op"))  # fmt: skip
        for t in node.output:
            after = users.get(t, [])
            if t in floats and (t in outputs or any(u.op_type != "QuantizeLinear" for u in after)):
                found.append(Violation(node=label, tensor=t, rule="integer-only", detail=f"writes float tensor {t!r} "
                                       f"that is not quantized; {target.name} runs no float op"))  # fmt: skip
    return found


def _float_tensors(model: onnx.ModelProto) -> set[str]:
    """Names of the float32 / float16 tensors of the model (graph inputs, initializers, inferred)."""
    kinds = (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16)
    light = onnx.ModelProto(ir_version=model.ir_version)
    light.opset_import.extend(model.opset_import)
    for name in ("node", "input", "output", "value_info"):
        getattr(light.graph, name).extend(getattr(model.graph, name))
    for init in model.graph.initializer:
        light.graph.initializer.add(name=init.name, data_type=init.data_type, dims=init.dims)
    try:
        inferred = onnx.shape_inference.infer_shapes(light).graph
    except Exception:  # types unknown: only the declared ones are checked
        inferred = light.graph
    values = (*inferred.input, *inferred.value_info, *inferred.output)
    out = {v.name for v in values if v.type.tensor_type.elem_type in kinds}
    return out | {i.name for i in model.graph.initializer if i.data_type in kinds}


def _open_unit(
    node: onnx.NodeProto,
    producer: dict[str, onnx.NodeProto],
    users: dict[str, list[onnx.NodeProto]],
    types: dict[str, int],
) -> str:
    """Why a linear with quantized operands is not a closed QDQ unit ("" when it is, or when it
    reads float operands and is not a unit at all)."""
    data = [producer.get(t) for t in node.input[:2] if t]
    if not data or not all(p is not None and p.op_type == "DequantizeLinear" for p in data):
        return ""
    activation = next((p for p in data if p is not None and p.input[0] not in types), None)
    after = users.get(node.output[0], [])
    if len(after) != 1 or after[0].op_type != "QuantizeLinear":
        return "a quantized linear's output must go to one QuantizeLinear only (its weight DequantizeLinear is refused)"
    if activation is None:
        return ""
    zero_in, zero_out = _zero_type(activation, types), _zero_type(after[0], types)
    if zero_in != zero_out:
        return f"output quantized as {zero_out}, input as {zero_in}; the unit needs one type"
    return ""


def _zero_type(node: onnx.NodeProto, types: dict[str, int]) -> str:
    zero = node.input[2] if len(node.input) > 2 and node.input[2] else ""
    return TYPE_NAMES.get(types.get(zero, onnx.TensorProto.UINT8), "other")


def _activation_matmul(
    node: onnx.NodeProto, inits: dict[str, onnx.TensorProto], producer: dict[str, onnx.NodeProto]
) -> bool:
    """A MatMul whose operands are both activations: neither a weight initializer nor its DequantizeLinear."""

    def weight(t: str) -> bool:
        source = producer.get(t)
        return t in inits or (source is not None and source.op_type == "DequantizeLinear" and source.input[0] in inits)

    return node.op_type == "MatMul" and len(node.input) == 2 and not any(weight(t) for t in node.input)


def _model_rules(model: onnx.ModelProto, target: TargetProfile) -> list[Violation]:
    found = []
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None)
    if opset != target.opset:
        detail = f"the model has opset {opset}, {target.name} takes {target.opset}"
        found.append(Violation(node="(model)", tensor="(opset_import)", rule="opset", detail=detail))
    if target.static_shapes:
        for value in (*model.graph.input, *model.graph.output):
            dims = value.type.tensor_type.shape.dim
            if any(not d.HasField("dim_value") for d in dims):
                got = [d.dim_param or d.dim_value for d in dims]
                detail = f"{target.name} needs fixed dimensions, got {got}"
                found.append(Violation(node="(graph)", tensor=value.name, rule="static shapes", detail=detail))
    return found


def _qdq_rules(
    node: onnx.NodeProto,
    label: str,
    inits: dict[str, onnx.TensorProto],
    producer: dict[str, onnx.NodeProto],
    target: TargetProfile,
    users: dict[str, list[onnx.NodeProto]] | None = None,
) -> list[Violation]:
    """Storage type, symmetry, granularity and power-of-two rules for one Q or DQ node."""
    weight = node.op_type == "DequantizeLinear" and node.input[0] in inits
    if weight and target.integer_activations and not _reads_as_weight(node, users or {}, target):
        return _constant_rules(node, label, inits, target)
    if node.op_type == "DequantizeLinear" and not weight:
        source = producer.get(node.input[0])
        if source is not None and source.op_type == "QuantizeLinear":
            if list(source.input[1:]) != list(node.input[1:]):
                detail = "DequantizeLinear does not reuse its QuantizeLinear's scale and zero point"
                return [Violation(node=label, tensor=node.input[0], rule="Q/DQ pair", detail=detail)]
            return []  # its QuantizeLinear carries the checks
    scale_name = node.input[1]
    zero_name = node.input[2] if len(node.input) > 2 and node.input[2] else ""
    tensor = node.input[0]
    if scale_name not in inits or (zero_name and zero_name not in inits):
        if not weight and _dynamic(node, producer, target):
            return []  # a run-time quantizer the target computes (passes.techniques.dynamic)
        return [Violation(node=label, tensor=tensor, rule="static qparams",
                          detail="scale and zero point must be initializers (static quantization)")]  # fmt: skip
    scale = numpy_helper.to_array(inits[scale_name]).astype(np.float64)
    zero_type = inits[zero_name].data_type if zero_name else onnx.TensorProto.UINT8
    zero = numpy_helper.to_array(inits[zero_name]).astype(np.int64) if zero_name else np.zeros(())
    storage = TYPE_NAMES.get(inits[tensor].data_type if weight else zero_type, "other")
    found = []

    def bad(rule: str, detail: str) -> None:
        found.append(Violation(node=label, tensor=tensor, rule=rule, detail=detail))

    kind = "weight" if weight else "activation"
    allowed = sorted(set((target.weight_storage if weight else target.activation_storage).values()))
    if storage not in allowed:
        bad(f"{kind} storage", f"stored as {storage}, {target.name} takes {', '.join(allowed)}")
    symmetric = target.weight_symmetric if weight else target.activation_symmetric
    mid = 2 ** (_bits(storage) - 1) if storage.startswith("uint") else 0
    if symmetric and storage in TYPE_NAMES.values() and np.any(zero != mid):
        bad(f"{kind} symmetry", f"zero point {int(np.ravel(zero)[0])} where {target.name} needs {mid}")
    if weight:
        conv = any(u.op_type == "Conv" for u in (users or {}).get(node.output[0], []))
        found += _weight_rules(node, label, inits[tensor], scale, storage, target, 0 if conv else 1)
    elif scale.ndim != 0 or zero.ndim != 0:
        bad("per-tensor activations", f"activation scale has shape {list(scale.shape)}, expected a scalar")
    if target.pow2_scales:
        mantissa, _ = np.frexp(scale)
        if np.any(mantissa != 0.5):
            worst = float(np.ravel(scale)[np.argmax(np.ravel(mantissa) != 0.5)])
            bad("power-of-two scales", f"{kind} scale {worst!r} is not an exact power of two")
    return found


def _dynamic(node: onnx.NodeProto, producer: dict[str, onnx.NodeProto], target: TargetProfile) -> bool:
    """Whether a Q / DQ node with computed parameters is a run-time activation quantizer the target runs:
    DequantizeLinear of DynamicQuantizeLinear's outputs (per tensor), or a blocked pair (per token)."""
    if node.op_type == "DequantizeLinear" and node.input[0] in producer:
        source = producer[node.input[0]]
        if source.op_type == "DynamicQuantizeLinear":
            return "tensor" in target.dynamic_activations and list(source.output) == list(node.input)
    blocked = any(a.name == "block_size" and a.i > 0 for a in node.attribute)
    return blocked and "token" in target.dynamic_activations


def _reads_as_weight(dq: onnx.NodeProto, users: dict[str, list[onnx.NodeProto]], target: TargetProfile) -> bool:
    """Whether a dequantized constant is a linear's weight (the second operand of a quantized op)."""
    return any(u.op_type in target.quantized_ops and len(u.input) > 1 and u.input[1] == dq.output[0]
               for u in users.get(dq.output[0], []))  # fmt: skip


def _constant_rules(
    node: onnx.NodeProto, label: str, inits: dict[str, onnx.TensorProto], target: TargetProfile
) -> list[Violation]:
    """A quantized constant that is not a weight (an integer-only target's biases, norm scales,
    scalars): stored as one of the activation types or int32 (a bias on its operands' scales)."""
    storage = TYPE_NAMES.get(inits[node.input[0]].data_type, "other")
    allowed = sorted({*target.activation_storage.values(), "int32"})
    if storage in allowed:
        return []
    detail = f"stored as {storage}, {target.name} takes {', '.join(allowed)} for constants"
    return [Violation(node=label, tensor=node.input[0], rule="constant storage", detail=detail)]


def _weight_rules(
    node: onnx.NodeProto,
    label: str,
    init: onnx.TensorProto,
    scale: np.ndarray,
    storage: str,
    target: TargetProfile,
    channel_axis: int = 1,
) -> list[Violation]:
    found = []

    def bad(rule: str, detail: str) -> None:
        found.append(Violation(node=label, tensor=init.name, rule=rule, detail=detail))

    if scale.ndim == 2:
        block = next((a.i for a in node.attribute if a.name == "block_size"), 0)
        if storage not in target.blocked_weights:
            bad("blocked weights", f"{storage} weights per group of input channels; {target.name} runs "
                f"{', '.join(target.blocked_weights) or 'none'} blocked")  # fmt: skip
        elif not block or list(scale.shape) != [init.dims[0] // block, init.dims[1]]:
            bad("blocked weights", f"scale shape {list(scale.shape)} is not [in / block_size, out] for block_size "
                f"{block} along the input axis")  # fmt: skip
    elif not target.weight_per_channel and scale.ndim != 0:
        bad("per-tensor weights", f"{target.name} takes one weight scale per tensor, got shape {list(scale.shape)}")
    if scale.ndim == 1:
        axis = next((a.i for a in node.attribute if a.name == "axis"), 1)
        channels = init.dims[axis] if -len(init.dims) <= axis < len(init.dims) else -1
        if axis not in (channel_axis, channel_axis - len(init.dims)) or channels != scale.shape[0]:
            bad("per-channel axis", f"{scale.shape[0]} scales along axis {axis}; expected the output channels, "
                f"axis {channel_axis}")  # fmt: skip
    if (
        target.weight_symmetric
        and storage.startswith("int")
        and init.data_type
        in (
            onnx.TensorProto.INT8,
            onnx.TensorProto.INT4,
        )
    ):
        lowest = -(2 ** (_bits(storage) - 1))
        if int(numpy_helper.to_array(init).min()) == lowest:
            bad("narrow weight range", f"symmetric weights use [{lowest + 1}, {-lowest - 1}]; found {lowest}")
    return found


def _bits(storage: str) -> int:
    return int(storage.lstrip("uint"))


def _shapes(model: onnx.ModelProto) -> dict[str, list[int]]:
    """Static shapes of every tensor: shape inference on a light copy (large initializers keep only
    their dims; small ones, such as Reshape targets, keep their values)."""
    light = onnx.ModelProto(ir_version=model.ir_version)
    light.opset_import.extend(model.opset_import)
    g = light.graph
    for name in ("node", "input", "output", "value_info"):
        getattr(g, name).extend(getattr(model.graph, name))
    for init in model.graph.initializer:
        if init.data_location != onnx.TensorProto.EXTERNAL and init.ByteSize() < 1024:
            g.initializer.append(init)
        else:
            g.initializer.add(name=init.name, data_type=init.data_type, dims=init.dims)
    try:
        inferred = onnx.shape_inference.infer_shapes(light)
    except Exception:  # shapes unknown: MACs read as 0, the rules still apply
        return {}
    out = {}
    for v in (*inferred.graph.input, *inferred.graph.value_info, *inferred.graph.output):
        dims = v.type.tensor_type.shape.dim
        if dims and all(d.HasField("dim_value") for d in dims):
            out[v.name] = [d.dim_value for d in dims]
    for i in model.graph.initializer:
        out[i.name] = list(i.dims)
    return out


def _macs(node: onnx.NodeProto, shapes: dict[str, list[int]]) -> int:
    """Multiply-accumulates of a MatMul / Gemm / Conv from its static shapes (0 for other ops)."""
    out = shapes.get(node.output[0]) if node.output else None
    a = shapes.get(node.input[0]) if node.input else None
    b = shapes.get(node.input[1]) if len(node.input) > 1 else None
    if out is None or a is None or b is None:
        return 0
    if node.op_type in ("MatMul", "MatMulInteger"):
        return int(np.prod(out)) * a[-1]
    if node.op_type == "Gemm":
        trans_a = next((x.i for x in node.attribute if x.name == "transA"), 0)
        return int(np.prod(out)) * (a[0] if trans_a else a[-1])
    if node.op_type == "Conv":
        return int(np.prod(out)) * int(np.prod(b[1:]))
    return 0
