"""A pipeline's transformer exported with its bound inputs (exporter.pipeline_parts): the
transformer called with the non-constant inputs as positional ONNX inputs and the constants inside,
FP32, static shapes; with the symbolics the TorchScript exporter lacks (RMS norm) or gets wrong
(repeat_interleave's shared axis constant)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import onnx
import torch
from torch import nn

from qexport.models.pipeline import TransformerCall

DENOISER_OPSET = 17


class BoundTransformer(nn.Module):
    """The transformer called with the bound inputs as positional ONNX inputs, constants inside."""

    def __init__(self, transformer: nn.Module, call: TransformerCall, layout: list[dict[str, Any]]) -> None:
        super().__init__()
        self.transformer = transformer
        self.names = [i["name"] for i in layout if i["source"] != "constant"]
        self.constants = {
            i["name"]: torch.from_numpy(call.kept[i["name"]]) for i in layout if i["source"] == "constant"
        }
        self.values = dict(call.values)

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        where = next(self.transformer.parameters()).device  # constants follow the transformer (verification on a GPU)
        constants = {k: v.to(where) for k, v in self.constants.items()}
        flat: dict[str, Any] = {**self.values, **constants, **dict(zip(self.names, inputs, strict=True))}
        args = [flat.pop(k) for k in sorted(k for k in flat if k.startswith("arg") and k[3:].isdigit())]
        kwargs: dict[str, Any] = {}
        for key, value in flat.items():
            head, _, rest = key.partition(".")
            if rest:
                kwargs.setdefault(head, {})[rest] = value
            else:
                kwargs[key] = value
        out = self.transformer(*args, **kwargs)
        return out[0] if isinstance(out, tuple | list) else out.sample


def _rms_norm(g: Any, x: Any, shape: Any, weight: Any, eps: Any) -> Any:
    """aten::rms_norm (Flux's, Wan's RMS norms) for the TorchScript exporter, which has none:
    x / sqrt(mean(x², last axes) + eps) · weight (ReduceMean's axes an attribute before opset 18)."""
    from torch.onnx import symbolic_helper as sh

    dims = sh._get_const(shape, "is", "normalized_shape")
    value = sh._maybe_get_const(eps, "f")
    epsilon = float(torch.finfo(torch.float32).eps) if sh._is_none(eps) else float(value)
    axes = list(range(-len(dims), 0))
    if getattr(g, "opset", DENOISER_OPSET) >= 18:  # axes became an input (g: the exporter's GraphContext)
        square = g.op("Mul", x, x)
        mean = g.op("ReduceMean", square, g.op("Constant", value_t=torch.tensor(axes)), keepdims_i=1)
    else:
        mean = g.op("ReduceMean", g.op("Mul", x, x), axes_i=axes, keepdims_i=1)
    root = g.op("Sqrt", g.op("Add", mean, g.op("Constant", value_t=torch.tensor(epsilon, dtype=torch.float32))))
    y = g.op("Div", x, root)
    return y if sh._is_none(weight) else g.op("Mul", y, weight)


def _repeat_interleave(g: Any, x: Any, repeats: Any, dim: Any = None, output_size: Any = None) -> Any:
    """aten::repeat_interleave with its own copy of `dim`: torch's opset-13 symbolic adds the rank to a
    negative dim in place, on the constant the tracer shares with every other -1 of the graph (LTX's
    rope then turns its timestep embedding's concat axis -1 into 2)."""
    from torch.onnx import symbolic_helper as sh
    from torch.onnx import symbolic_opset13

    if not sh._is_none(dim):
        dim = g.op("Constant", value_t=torch.tensor(int(sh._maybe_get_const(dim, "i"))))
    return symbolic_opset13.repeat_interleave(g, x, repeats, dim, output_size)


torch.onnx.register_custom_op_symbolic("aten::rms_norm", _rms_norm, DENOISER_OPSET)


torch.onnx.register_custom_op_symbolic("aten::repeat_interleave", _repeat_interleave, DENOISER_OPSET)


@torch.no_grad()
def export_denoiser(transformer: nn.Module, call: TransformerCall, layout: list[dict[str, Any]], path: Path) -> None:
    """transformer.onnx with the layout's non-constant inputs, FP32, static shapes."""
    model = BoundTransformer(transformer, call, layout).eval()
    inputs = tuple(torch.from_numpy(call.kept[n]) for n in model.names)
    torch.onnx.export(model, inputs, str(path), dynamo=False, opset_version=DENOISER_OPSET, input_names=model.names,
                      output_names=["output"], do_constant_folding=True)  # fmt: skip
    onnx.checker.check_model(str(path))
