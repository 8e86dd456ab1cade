"""passes.fp_weights: a GPU build's host copies of the quantized linears' FP weights released while
planning, read from the device copy with the same values, and made again afterwards."""

from __future__ import annotations

import weakref

import numpy as np
import onnx_graphsurgeon as gs
import pytest
import torch
from qexport.exporter.replay import device_copy
from qexport.passes.fp_weights import FPWeights, OnDevice, graph_weights, release, restore
from torch import nn


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 4), nn.Linear(4, 3))


def _constants(model: nn.Module) -> dict[str, gs.Constant]:
    """The FP export's constants: W^T views of the parameters (layer 0), and a copy (layer 1)."""
    first = model[0].weight.detach().numpy().T
    second = model[1].weight.detach().numpy().T.copy()
    return {"w0": gs.Constant("w0", first), "w1": gs.Constant("w1", second)}


GPU = pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU"))


@pytest.mark.parametrize("where", ["cpu", GPU])
def test_release_reads_the_device_copy_and_restore_makes_the_host_weights_again(where: str) -> None:
    host = _model()
    expected = {name: p.detach().clone() for name, p in host.named_parameters()}
    device = device_copy(
        host, torch.device(where)
    )  # the replay's own transformer (a GPU's: read on a stream of its own)
    constants, names = _constants(host), {"0": "w0", "1": "w1"}
    before = {layer: np.array(constants[name].values) for layer, name in names.items()}
    view = weakref.ref(constants["w0"].values)
    emptied = release(constants, names, host, device)
    assert view() is None  # nothing holds the host weight's memory any more
    assert list(emptied) == ["0"]  # the copy (not a view of the parameter) is left as it was
    assert host[0].weight.numel() == 0 and host[1].weight.numel() == 12
    assert isinstance(constants["w0"]._values, OnDevice) and constants["w0"].shape == (6, 4)
    weights = graph_weights(constants, names)
    assert isinstance(weights, FPWeights) and list(weights) == ["0", "1"]
    assert isinstance(constants["w0"]._values, OnDevice)  # read through FPWeights, not loaded into the graph
    for layer in names:
        assert np.array_equal(weights[layer], before[layer]) and weights.size(layer) == before[layer].size
        assert np.array_equal(weights.row_abs_max(layer), np.abs(before[layer]).max(axis=1))
    assert weights.device_weight("1") is None and torch.equal(weights.device_weight("0"), device[0].weight.T)
    again = graph_weights({name: c.copy() for name, c in constants.items()}, names)  # another range's graph
    assert again.row_abs_max("0") is weights.row_abs_max("0")  # the released weight's, computed once
    restore(emptied, device)
    assert all(torch.equal(p, expected[name]) for name, p in host.named_parameters())


def test_nothing_released_reads_the_graph_arrays() -> None:
    host = _model()
    constants = _constants(host)
    weights = graph_weights(constants, {"0": "w0", "1": "w1"})
    assert weights["0"] is constants["w0"].values and weights.device_weight("0") is None
    again = graph_weights({name: c.copy() for name, c in constants.items()}, {"0": "w0", "1": "w1"})  # another range
    assert again.row_abs_max("1") is weights.row_abs_max("1")  # computed once a build, kept
    assert FPWeights.of(weights) is weights and FPWeights.of({"0": weights["0"]})["0"] is weights["0"]


@pytest.mark.parametrize("shape", [(5, 7), (1, 3)])
def test_a_loaded_released_constant_gives_the_weight(shape: tuple[int, int]) -> None:
    weight = torch.randn(*shape)
    loaded = gs.Constant("w", OnDevice(weight)).values  # graphsurgeon's own load
    assert np.array_equal(loaded, weight.numpy().T) and not loaded.flags.writeable


def test_a_released_weight_reads_the_fp_values_while_a_simulation_swaps_the_parameter() -> None:
    host = _model()
    device = device_copy(host, torch.device("cpu"))
    constants, names = _constants(host), {"0": "w0"}
    fp = device[0].weight.detach().clone()
    release(constants, names, host, device)
    weights = graph_weights(constants, names)
    saved = device[0].weight.data
    device[0].weight.data = torch.zeros_like(fp)  # what exporter.simulate.simulated does for a scored plan
    try:
        assert np.array_equal(weights["0"], fp.numpy().T)
        assert torch.equal(weights.device_weight("0"), fp.T)
    finally:
        device[0].weight.data = saved


def test_membership_size_and_row_maxima_read_no_released_weight_back(monkeypatch) -> None:
    import qexport.passes.fp_weights as fp_weights

    host = _model()
    device = device_copy(host, torch.device("cpu"))
    constants, names = _constants(host), {"0": "w0", "1": "w1"}
    release(constants, names, host, device)
    weights = graph_weights(constants, names)

    def read_back(weight: torch.Tensor) -> np.ndarray:
        raise AssertionError("a released weight was read back to the host")

    monkeypatch.setattr(fp_weights, "_host", read_back)
    assert "0" in weights and "2" not in weights and set(weights) == {"0", "1"}
    assert weights.size("0") == 24 and weights.row_abs_max("0").shape == (6,)
    with pytest.raises(AssertionError, match="read back"):
        weights["0"]
