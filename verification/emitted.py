"""Facts about quantized layers read off an emitted ONNX file (no weights loaded): each layer's
MatMul output tensor, which layers share their activation QuantizeLinear/DequantizeLinear, and
(--precompute-kv) the rows a step model replicates from each precomputed K/V input."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx.external_data_helper import load_external_data_for_tensor


def _matmuls(path: Path, layers: list[str], ids: dict[str, str]) -> dict[str, onnx.NodeProto]:
    model = onnx.load(str(path), load_external_data=False)
    by_weight = {n.input[1]: n for n in model.graph.node if n.op_type == "MatMul" and len(n.input) > 1}
    return {layer: by_weight[f"{ids[layer]}:w_dq"] for layer in layers if f"{ids[layer]}:w_dq" in by_weight}


def matmul_outputs(path: Path, layers: list[str], ids: dict[str, str]) -> dict[str, str]:
    """Each quantized layer's MatMul output tensor (its weight input is ``L<i>:w_dq``)."""
    return {layer: node.output[0] for layer, node in _matmuls(path, layers, ids).items()}


def shared_input_layers(path: Path, layers: list[str], ids: dict[str, str]) -> set[str]:
    """Layers whose quantized input feeds more than one quantized MatMul (q/k/v of one tensor)."""
    nodes = _matmuls(path, layers, ids)
    readers: dict[str, int] = {}
    for node in nodes.values():
        readers[node.input[0]] = readers.get(node.input[0], 0) + 1
    return {layer for layer, node in nodes.items() if readers[node.input[0]] > 1}


def expand_kv(step_path: Path, outputs: dict[str, np.ndarray], ids: dict[str, str]) -> dict[str, np.ndarray]:
    """kv.onnx's outputs in the layout the step model uses them: each runs through the step model's
    own row-replicating nodes (input ``layer`` -> ``L<i>:kv_full``), as onnxruntime runs them."""
    model = onnx.load(str(step_path), load_external_data=False)
    producer = {o: n for n in model.graph.node for o in n.output}
    inits = {i.name: i for i in model.graph.initializer}
    full = {}
    for layer, value in outputs.items():
        end, nodes = f"{ids[layer]}:kv_full", []
        tensor = end
        while tensor in producer and tensor != layer:
            nodes.append(producer[tensor])
            tensor = producer[tensor].input[0]
        if tensor != layer or not nodes:
            full[layer] = value  # no replication: the step model reads the input as it is
            continue
        params = [inits[i] for n in nodes for i in n.input[1:] if i in inits]
        for p in params:
            if p.data_location == onnx.TensorProto.EXTERNAL:
                load_external_data_for_tensor(p, str(step_path.parent))
        graph = onnx.helper.make_graph(
            nodes[::-1],
            "expand_kv",
            [onnx.helper.make_tensor_value_info(layer, onnx.TensorProto.FLOAT, value.shape)],
            [onnx.helper.make_tensor_value_info(end, onnx.TensorProto.FLOAT, None)],
            initializer=params,
        )
        expand = onnx.helper.make_model(graph, opset_imports=model.opset_import, ir_version=model.ir_version)
        session = ort.InferenceSession(expand.SerializeToString(), providers=["CPUExecutionProvider"])
        full[layer] = session.run(None, {layer: value})[0]
    return full
