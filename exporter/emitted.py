"""Facts about quantized layers read off an emitted ONNX file (no weights loaded): each layer's
MatMul output tensor, and which layers share their activation QuantizeLinear/DequantizeLinear."""

from __future__ import annotations

from pathlib import Path

import onnx


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
