"""ONNX shape inference without weights: on a skeleton whose large tensors carry only their dtype
and dims (shape inference reads no weight values), so no weight is copied and a model over
protobuf's 2 GB limit needs no detour through files. ``infer_shapes`` takes a ModelProto,
``infer_graph_shapes`` an onnx-graphsurgeon graph (whose arrays are never exported)."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from google.protobuf.message import EncodeError  # type: ignore[import-untyped]  # protobuf ships no stubs

from qexport.errors import QexportError

STUB_BYTES = 1024  # initializers this large enter shape inference as dtype + dims only


def _data_bytes(init: onnx.TensorProto) -> int:
    if init.HasField("raw_data"):
        return len(init.raw_data)
    return sum(len(getattr(init, f)) for f in ("float_data", "int32_data", "int64_data", "double_data", "uint64_data"))


def infer_shapes(model: onnx.ModelProto) -> onnx.ModelProto:
    """ONNX shape inference, in place; returns model.

    Inference runs on a skeleton whose large initializers and node tensor attributes (a Constant's
    value, any other node's tensor) carry only their dtype and dims (shape inference reads no weight
    values), so no weight is copied and a model over protobuf's 2 GB limit needs no detour through files.

    Raises:
        QexportError: the skeleton itself is over the limit (its largest parts named).
    """
    skeleton = onnx.ModelProto()
    skeleton.ir_version = model.ir_version
    skeleton.opset_import.extend(model.opset_import)
    skeleton.functions.extend(model.functions)
    graph, src = skeleton.graph, model.graph
    graph.name = src.name
    for part in ("input", "output", "value_info", "sparse_initializer"):
        getattr(graph, part).extend(getattr(src, part))
    for node in src.node:
        heavy = {a.name for a in node.attribute if a.HasField("t") and _data_bytes(a.t) >= STUB_BYTES}
        if not heavy:
            graph.node.append(node)
            continue
        light = graph.node.add()
        light.op_type, light.name, light.domain = node.op_type, node.name, node.domain
        light.input.extend(node.input)
        light.output.extend(node.output)
        for attribute in node.attribute:
            if attribute.name in heavy:
                _stub(light.attribute.add(), attribute)
            else:
                light.attribute.append(attribute)
    for init in src.initializer:
        if _data_bytes(init) < STUB_BYTES:
            graph.initializer.append(init)
            continue
        _stub_tensor(graph.initializer.add(), init)
    try:
        inferred = onnx.shape_inference.infer_shapes(skeleton).graph
    except EncodeError as err:
        raise QexportError(f"shape inference: the weightless skeleton is over 2 GB; {_largest(skeleton)}") from err
    del src.value_info[:]
    src.value_info.extend(inferred.value_info)
    del src.output[:]
    src.output.extend(inferred.output)
    return model


def _largest(model: onnx.ModelProto, n: int = 5) -> str:
    """The n largest nodes of a graph by serialized size, as 'name (op): bytes'."""
    sizes = sorted(((node.ByteSize(), node.name, node.op_type) for node in model.graph.node), reverse=True)[:n]
    return "largest nodes: " + ", ".join(f"{name} ({op}): {size} B" for size, name, op in sizes)


def _stub_tensor(stub: onnx.TensorProto, tensor: onnx.TensorProto) -> None:
    """stub := tensor's name, dtype and dims, its data marked external (never read)."""
    stub.name, stub.data_type = tensor.name, tensor.data_type
    stub.dims.extend(tensor.dims)
    _mark_external(stub)


def _mark_external(stub: onnx.TensorProto) -> None:
    """Data marked external at a location that is never read."""
    stub.data_location = onnx.TensorProto.EXTERNAL
    entry = stub.external_data.add()
    entry.key, entry.value = "location", "shape-only"


def _stub(stub: onnx.AttributeProto, attribute: onnx.AttributeProto) -> None:
    stub.name, stub.type = attribute.name, attribute.type
    _stub_tensor(stub.t, attribute.t)


def infer_graph_shapes(graph: gs.Graph) -> gs.Graph:
    """Shapes and dtypes of graph's variables from ONNX shape inference, in place; returns graph.

    A copy of the graph (its arrays shared) is exported with every large constant replaced by a
    stub of its dtype and dims, so no array is serialized.

    Raises:
        QexportError: the skeleton itself is over the 2 GB limit (its largest parts named).
    """
    light = graph.copy()
    for tensor in light.tensors().values():
        if isinstance(tensor, gs.Constant) and tensor.values.nbytes >= STUB_BYTES:
            stub = onnx.TensorProto()
            stub.name, stub.data_type = tensor.name, onnx.helper.np_dtype_to_tensor_dtype(np.dtype(tensor.dtype))
            stub.dims.extend(tensor.shape)
            _mark_external(stub)
            tensor._values = gs.ir.tensor.LazyValues(stub)  # exported as the stub itself (no array copy)
    model = gs.export_onnx(light, do_type_check=False)
    inferred = infer_shapes(model).graph
    variables = {name: t for name, t in graph.tensors().items() if isinstance(t, gs.Variable)}
    for info in [*inferred.value_info, *inferred.output]:
        tensor = variables.get(info.name)
        kind = info.type.tensor_type
        if tensor is None or not kind.elem_type:
            continue
        tensor.dtype = onnx.helper.tensor_dtype_to_np_dtype(kind.elem_type)
        if kind.HasField("shape"):
            tensor.shape = [d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in kind.shape.dim]
    return graph
