"""Where a range's FP weights come from: the FP graph's constants (views of the host transformer's
parameters), or, in a build on a GPU, the replay's copy of the transformer on that device.

A GPU build holds every weight twice: on the host, the FP graph's constants; on the GPU, the
replay's transformer. The host copies of the linears it quantizes are read only while a range is
planned (each layer's W^T, its largest |W| per input channel), so such a build can let them go
after the FP export (`release`): each constant then holds an `OnDevice` (its shape and type, and
the device weight), planning reads a layer through `FPWeights` when it needs it, and the host
parameters are made again from the device when the models are built (`restore`). The values are
the same float32 numbers either way (a copy between devices is exact), so the build's bytes are too.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterator, Mapping
from contextlib import AbstractContextManager, nullcontext

import numpy as np
import onnx_graphsurgeon as gs
import torch
from torch import nn


class OnDevice(gs.ir.tensor.LazyValues):
    """A released FP weight constant: W^T [in, out] of a linear whose weight [out, in] is on a
    device. Loaded (graphsurgeon's `Constant.values`), it is read back to the host, and graphsurgeon
    keeps that copy: planning reads it through FPWeights instead, which keeps none."""

    def __init__(self, weight: torch.Tensor) -> None:  # graphsurgeon's TensorProto is not needed
        self.weight = weight.detach()  # the storage itself: a simulation swaps the parameter's .data
        self.shape = (int(weight.shape[1]), int(weight.shape[0]))
        self.dtype = np.dtype(np.float32)
        self.nbytes = weight.numel() * 4

    def load(self) -> np.ndarray:
        return _host(self.weight)

    def __str__(self) -> str:
        return f"OnDevice (shape={self.shape}, device={self.weight.device})"


_READERS: dict[torch.device, torch.cuda.Stream] = {}


def _reading(weight: torch.Tensor) -> AbstractContextManager[object]:
    """Where a released weight is read back: a CUDA stream of its own, so that a plan made while the
    device scores another (exporter.search's planning ahead) does not wait behind that work in the
    default stream. The weights are not written after the release, so no order between them is needed."""
    if weight.device.type != "cuda":
        return nullcontext()
    if weight.device not in _READERS:
        _READERS[weight.device] = torch.cuda.Stream(weight.device)
    return torch.cuda.stream(_READERS[weight.device])


def _host(weight: torch.Tensor) -> np.ndarray:
    """W^T of a device weight as a read-only host array (a transposed view of the copy)."""
    with _reading(weight):
        values = weight.T.cpu().numpy()
    values.flags.writeable = False
    return values


class FPWeights(Mapping[str, np.ndarray]):
    """FP W^T [in, out] per layer, as planning reads it: the host's array where it holds one, else
    read back from the device on each use and not kept (a range's planning holds the layers in
    flight, not the model). Each layer's largest |W| per input channel is computed where the weight
    is, once a build: every range's plans (a search's candidates) smooth the same FP weights."""

    def __init__(self, values: Mapping[str, np.ndarray | OnDevice]) -> None:
        self._values = dict(values)

    @classmethod
    def of(cls, weights: Mapping[str, np.ndarray]) -> FPWeights:
        """weights as FPWeights: itself if it is one, else its host arrays."""
        return weights if isinstance(weights, FPWeights) else cls(weights)

    def __getitem__(self, layer: str) -> np.ndarray:
        value = self._values[layer]
        return _host(value.weight) if isinstance(value, OnDevice) else value

    def __iter__(self) -> Iterator[str]:
        return iter(self._values)

    def __len__(self) -> int:
        return len(self._values)

    def __contains__(self, layer: object) -> bool:  # Mapping's own would read the weight
        return layer in self._values

    def device_weight(self, layer: str) -> torch.Tensor | None:
        """W^T [in, out] on the device (a view), or None where the host holds the layer."""
        value = self._values[layer]
        return value.weight.T if isinstance(value, OnDevice) else None

    def size(self, layer: str) -> int:
        """The layer's weight count, without reading a device-held one back."""
        value = self._values[layer]
        return value.weight.numel() if isinstance(value, OnDevice) else value.size

    def row_abs_max(self, layer: str) -> np.ndarray:
        """max |W| per input channel (float32; the same values on either device: a maximum is exact)."""
        return _row_abs_max(self._values[layer])


_ROW_MAX: dict[int, tuple[weakref.ref[object], np.ndarray]] = {}


def _row_abs_max(value: np.ndarray | OnDevice) -> np.ndarray:
    """max |W| per input channel of W^T, kept while the array (or released weight) lives: every
    range's graph shares the FP export's constants, so a build computes each layer's once."""
    key = id(value)
    hit = _ROW_MAX.get(key)
    if hit is not None and hit[0]() is value:
        return hit[1]
    if isinstance(value, OnDevice):
        with _reading(value.weight):
            found = value.weight.abs().amax(dim=0).cpu().numpy()
    else:
        found = np.abs(value).max(axis=1)
    _ROW_MAX[key] = (weakref.ref(value, lambda _: _ROW_MAX.pop(key, None)), found)
    return found


def graph_weights(constants: Mapping[str, gs.Tensor], names: Mapping[str, str]) -> FPWeights:
    """Each layer's W^T from the graph's constants (names: layer -> constant name); a released one
    is not loaded into the graph (graphsurgeon would keep the copy)."""
    return FPWeights({layer: _graph_value(constants[name]) for layer, name in names.items()})


def _graph_value(constant: gs.Tensor) -> np.ndarray | OnDevice:
    value = constant._values
    return value if isinstance(value, OnDevice) else np.asarray(constant.values)


def release(
    constants: Mapping[str, gs.Tensor], names: Mapping[str, str], host: nn.Module, device: nn.Module
) -> dict[str, nn.Parameter]:
    """Let the host copies of the named layers' weights go: each constant that is exactly a view
    W^T of its host parameter gets an OnDevice of the device module's weight instead, and the host
    parameter's storage is emptied. Returns the emptied parameters (for restore). A constant that
    is anything else (another layout, a copy) is left as it is."""
    host_modules, device_modules = dict(host.named_modules()), dict(device.named_modules())
    emptied: dict[str, nn.Parameter] = {}
    for layer, name in names.items():
        constant, param = constants[name], host_modules[layer].weight
        values = constant._values
        if not isinstance(constant, gs.Constant) or not _is_transposed_view(values, param):
            continue
        constant._values = OnDevice(device_modules[layer].weight)
        param.data = torch.empty(0, dtype=param.dtype)  # its storage goes with the last view
        emptied[layer] = param
    for on in {device_modules[layer].weight.device for layer in emptied}:
        if on.type == "cuda":  # the weights written before they are read on a stream of their own
            torch.cuda.synchronize(on)
    return emptied


def restore(emptied: dict[str, nn.Parameter], device: nn.Module) -> None:
    """Make the emptied host parameters again from the device module's weights."""
    modules = dict(device.named_modules())
    for layer, param in emptied.items():
        param.data = modules[layer].weight.detach().to("cpu", copy=True)


def _is_transposed_view(values: object, param: torch.Tensor) -> bool:
    """Whether values is param's memory read as W^T (the FP export's constants are such views)."""
    if not isinstance(values, np.ndarray) or param.device.type != "cpu" or param.dim() != 2:
        return False
    host = param.detach().numpy().T
    return (
        values.shape == host.shape
        and values.strides == host.strides
        and values.dtype == host.dtype
        and values.__array_interface__["data"][0] == host.__array_interface__["data"][0]
    )
