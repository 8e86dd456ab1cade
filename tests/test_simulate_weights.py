"""The simulation's weights made on the transformer's device: the float-kept layers' int8 storage
rounded in torch and the quantized linears' integers dequantized there give the numpy results bit
for bit, and a search's candidates that share a layer's arrays send its weight once."""

import dataclasses
import gc
import weakref

import numpy as np
import torch
from qexport.exporter.simulate import Uploads, device_weight, rounded_rows
from qexport.passes.plan import LayerPlan
from qexport.passes.quant import Grid
from qexport.passes.weight_only import rounded

RNG = np.random.default_rng(0)
CPU = torch.device("cpu")


def _plan(w_scale: np.ndarray, w_zero: np.ndarray, n: int = 64) -> LayerPlan:
    out = w_scale.shape[-1]
    w_q = RNG.integers(-128, 128, (n, out)).astype(np.int8)
    return LayerPlan(w_q=w_q, w_scale=w_scale, w_zero=w_zero, w_grid=Grid(bits=8, storage="int8", symmetric=False),
                     a_scale=np.float32(1), a_zero=np.uint8(0), a_grid=Grid(bits=8, storage="uint8", symmetric=False),
                     divisor=None)  # fmt: skip


def test_rounded_rows_is_the_int8_storage_bit_for_bit():
    w = (RNG.standard_normal((48, 80)) * RNG.uniform(1e-4, 10, (48, 1))).astype(np.float32)
    w[3] = 0.0  # an all-zero row: scale 1
    w[5] = 0.0
    w[5, :4] = [31.75, 0.125, 0.375, -0.625]  # scale 31.75 / 127 = 0.25 exactly: ties at 0.5, 1.5, -2.5
    assert np.array_equal(rounded_rows(torch.from_numpy(w)).numpy(), rounded(w, 0))


def test_device_weight_is_the_plans_weight_bit_for_bit():
    out = 24
    scale = RNG.uniform(1e-3, 1e-1, out).astype(np.float32)
    per_channel = _plan(scale, RNG.integers(-3, 3, out).astype(np.int8))
    groups = _plan(RNG.uniform(1e-3, 1e-1, (4, out)).astype(np.float32), RNG.integers(-3, 3, (4, out)).astype(np.int8))
    for lp in (per_channel, groups):
        got = device_weight(lp, CPU)
        assert got.shape == (out, 64) and got.is_contiguous()
        assert np.array_equal(got.numpy(), lp.weight().T)


def test_uploads_send_a_shared_weight_once_and_a_new_one_again():
    out = 16
    lp = _plan(np.full(out, 0.01, np.float32), np.zeros(out, np.int8))
    uploads = Uploads()
    first = uploads.weight("a", lp, CPU)
    shrunk = dataclasses.replace(lp, a_scale=np.float32(0.5))  # another ratio: the same weight arrays
    assert uploads.weight("a", shrunk, CPU) is first
    other = dataclasses.replace(lp, w_q=lp.w_q.copy())  # another alpha: new arrays, even with equal values
    again = uploads.weight("a", other, CPU)
    assert again is not first and torch.equal(again, first)
    assert np.array_equal(uploads.weight("b", lp, CPU).numpy(), lp.weight().T)


def test_uploads_hold_no_plan_that_was_dropped():
    out = 16
    lp = _plan(np.full(out, 0.01, np.float32), np.zeros(out, np.int8))
    uploads = Uploads()
    first = uploads.weight("a", lp, CPU)
    gone = weakref.ref(lp.w_q)
    del lp
    gc.collect()
    assert gone() is None  # the device weight stays; the host integers it came from are freed
    later = _plan(np.full(out, 0.01, np.float32), np.zeros(out, np.int8))
    again = uploads.weight("a", later, CPU)
    assert again is not first and np.array_equal(again.numpy(), later.weight().T)
