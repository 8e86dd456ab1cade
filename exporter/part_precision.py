"""How a pipeline's text encoder and VAE decoder parts store their weights (the recipe's
``parts.precision``): FP32 as exported; FP16 storage, each weight cast back to FP32 where it is read;
or weight-only int8 (symmetric, per output channel) for the MatMul, Gemm and Conv weights through
DequantizeLinear, the other weights in FP16 storage. The computation stays FP32 and the parts' inputs
and outputs keep their dtypes; no other node of the graph is changed."""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper
from onnx.external_data_helper import load_external_data_for_model
from qexport.passes.weight_only import quantize

from qexport.recipe import PartPrecision

log = logging.getLogger(__name__)

MIN_ELEMENTS = 1024  # float weights smaller than this stay FP32 (norms, biases, scalars): a Cast would cost more
FP16_MAX = float(np.finfo(np.float16).max)  # a weight beyond it stays FP32
EXTERNAL_ABOVE = 2_000_000_000  # weight bytes above which a part's weights go to <model>.data (protobuf's 2 GiB)


def export_part(write: Callable[[Path], None], path: Path, precision: PartPrecision) -> dict[str, Any]:
    """Export a part in FP32 with `write` (given a path in a temporary folder beside `path`), store
    its weights in `precision` at `path`, and check the file with onnx.checker.

    Args:
        write: writes the FP32 ONNX model to the path it is given (torch.onnx.export).
        path: where the part goes; its external weights, if any, go beside it.
        precision: how the weights are stored.

    Returns:
        The part's manifest fields: ``precision`` and ``data`` (its external weights file, or None).
    """
    with tempfile.TemporaryDirectory(dir=path.parent, prefix=".export-") as tmp:
        exported = Path(tmp) / path.name
        write(exported)
        # a large part's weights stay in the export's external data until each is converted: its
        # FP32 weights are never held whole beside the converted ones (a T5-XXL part: 19 GB)
        model = onnx.load(str(exported), load_external_data=False)
        STORES[precision](model, tmp)
        load_external_data_for_model(model, tmp)  # what stays FP32, before the folder goes
    data = save_part(model, path)
    onnx.checker.check_model(str(path))
    return {"precision": precision.value, "data": data}


def save_part(model: onnx.ModelProto, path: Path) -> str | None:
    """Save model at path, its weights in ``<path>.data`` when they exceed EXTERNAL_ABOVE; returns
    that file's name, or None."""
    if weight_bytes(model) <= EXTERNAL_ABOVE:
        onnx.save_model(model, str(path))
        return None
    data = f"{path.name}.data"
    (path.parent / data).unlink(missing_ok=True)  # onnx appends to an existing file
    onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True, location=data,
                    size_threshold=1024)  # fmt: skip
    return data


def weight_bytes(model: onnx.ModelProto) -> int:
    """Bytes of the graph's initializers and Constant-node tensors (from dtype and dims)."""
    tensors = [*model.graph.initializer]
    tensors += [a.t for n in model.graph.node if n.op_type == "Constant" for a in n.attribute if a.HasField("t")]
    return sum(int(np.prod(t.dims)) * helper.tensor_dtype_to_np_dtype(t.data_type).itemsize for t in tensors)


def fp16_storage(model: onnx.ModelProto, base_dir: str = "", keep: frozenset[str] = frozenset()) -> onnx.ModelProto:
    """Each FP32 initializer of MIN_ELEMENTS or more (but those named in `keep`, those beyond FP16's
    range, graph inputs) stored in FP16 as ``<name>.fp16``, a Cast to FP32 giving ``<name>`` back to
    its readers; in place, returns model. base_dir: where external data, if any, is read from (each
    converted tensor is read alone; the others stay external)."""
    graph = model.graph
    skip = keep | {i.name for i in graph.input}
    casts, wide = [], 0
    for init in graph.initializer:
        if init.name in skip or init.data_type != TensorProto.FLOAT or np.prod(init.dims) < MIN_ELEMENTS:
            continue
        values = numpy_helper.to_array(init, base_dir)
        if not np.abs(values).max() <= FP16_MAX:  # also NaN
            wide += 1
            continue
        name = init.name
        init.CopyFrom(numpy_helper.from_array(values.astype(np.float16), f"{name}.fp16"))
        casts.append(helper.make_node("Cast", [init.name], [name], name=f"{name}.to_fp32", to=TensorProto.FLOAT))
    _prepend(graph, casts)
    log.info("%s: %d weights stored in fp16, %d kept in fp32 (beyond fp16's range)", graph.name, len(casts), wide)
    return model


def int8_weights(model: onnx.ModelProto, base_dir: str = "") -> onnx.ModelProto:
    """Each FP32 initializer of MIN_ELEMENTS or more that is read only as the weight of MatMul (2-D),
    Gemm or Conv stored as int8 per output channel (``<name>.int8``, ``.scale``, ``.zero``), a
    DequantizeLinear giving ``<name>`` back to its readers; the other weights as fp16_storage; in
    place, returns model. base_dir: as fp16_storage's."""
    graph = model.graph
    axes = weight_axes(graph)
    scales, dequantize = set(), []
    for init in list(graph.initializer):
        axis = axes.get(init.name)
        if axis is None or init.data_type != TensorProto.FLOAT or np.prod(init.dims) < MIN_ELEMENTS:
            continue
        name = init.name
        q, scale = quantize(numpy_helper.to_array(init, base_dir), axis)
        init.CopyFrom(numpy_helper.from_array(q, f"{name}.int8"))
        zero = np.zeros(scale.shape, np.int8)
        graph.initializer.extend([numpy_helper.from_array(scale, f"{name}.scale"),
                                  numpy_helper.from_array(zero, f"{name}.zero")])  # fmt: skip
        scales.add(f"{name}.scale")
        dequantize.append(helper.make_node("DequantizeLinear", [f"{name}.int8", f"{name}.scale", f"{name}.zero"],
                                           [name], name=f"{name}.dequantize", axis=axis))  # fmt: skip
    _prepend(graph, dequantize)
    log.info("%s: %d weights stored in int8", graph.name, len(dequantize))
    return fp16_storage(model, base_dir, keep=frozenset(scales))


def weight_axes(graph: onnx.GraphProto) -> dict[str, int]:
    """Initializer name -> its output-channel axis, for those every node reads as the weight input of
    a MatMul (2-D: axis 1), a Gemm (axis 0 with transB, else 1) or a Conv (axis 0), all on one axis."""
    ranks = {i.name: len(i.dims) for i in graph.initializer}
    seen: dict[str, set[int | None]] = {}
    for node in graph.node:
        for index, name in enumerate(node.input):
            if name in ranks:
                seen.setdefault(name, set()).add(_weight_axis(node, index, ranks[name]))
    return {name: axis for name, axes in seen.items() if len(axes) == 1 and (axis := next(iter(axes))) is not None}


def _weight_axis(node: onnx.NodeProto, index: int, rank: int) -> int | None:
    if index != 1:
        return None
    if node.op_type == "MatMul" and rank == 2:
        return 1
    if node.op_type == "Gemm" and rank == 2:
        trans = next((a.i for a in node.attribute if a.name == "transB"), 0)
        return 0 if trans else 1
    if node.op_type == "Conv" and rank >= 3:
        return 0
    return None


def _prepend(graph: onnx.GraphProto, nodes: list[onnx.NodeProto]) -> None:
    """nodes first in the graph (they read initializers only), keeping it topologically sorted."""
    if nodes:
        rest = list(graph.node)
        del graph.node[:]
        graph.node.extend([*nodes, *rest])


STORES: dict[PartPrecision, Callable[[onnx.ModelProto, str], onnx.ModelProto]] = {
    PartPrecision.FP32: lambda model, base_dir: model,
    PartPrecision.FP16: fp16_storage,
    PartPrecision.INT8_WEIGHTS: int8_weights,
}
