import numpy as np
import pytest
from qexport.passes.quant import Grid, dequantize, mse_clipped_qparams, qparams, quantize


def _err(w, scale, zero, grid):
    return ((dequantize(quantize(w, scale[None], zero[None], grid), scale[None], zero[None]) - w) ** 2).sum(0)


@pytest.mark.parametrize("bits,storage", [(8, "int8"), (6, "int8"), (4, "int4"), (3, "int4")])
def test_mse_clipping_never_loses_to_minmax_and_helps_heavy_tails(bits, storage):
    w = np.random.default_rng(bits).standard_t(3, (256, 48)).astype(np.float32)
    grid = Grid(bits=bits, storage=storage, symmetric=True)
    minmax = _err(w, *qparams(w.min(0), w.max(0), grid), grid)
    mse = _err(w, *mse_clipped_qparams(w, grid), grid)
    assert (mse <= minmax + 1e-9).all()
    if bits <= 4:
        assert mse.sum() < 0.9 * minmax.sum()


def test_grids_and_restricted_ranges():
    assert (Grid(bits=8, storage="int8", symmetric=True).qmin, Grid(bits=8, storage="int8", symmetric=True).qmax) == (
        -127,
        127,
    )
    assert (Grid(bits=6, storage="int8", symmetric=True).qmin, Grid(bits=6, storage="int8", symmetric=True).qmax) == (
        -31,
        31,
    )
    assert (
        Grid(bits=4, storage="uint8", symmetric=False).qmin,
        Grid(bits=4, storage="uint8", symmetric=False).qmax,
    ) == (0, 15)
    x = np.linspace(-3, 5, 1001).astype(np.float32)
    g = Grid(bits=8, storage="uint8", symmetric=False)
    scale, zero = qparams(np.asarray(x.min()), np.asarray(x.max()), g)
    q = quantize(x, scale, zero, g)
    assert q.min() == 0 and q.max() == 255 and np.abs(dequantize(q, scale, zero) - x).max() <= scale / 2 + 1e-6
    s2, _ = qparams(np.asarray(-3.0), np.asarray(5.0), g, pow2=True)
    assert np.log2(s2) == np.round(np.log2(s2)) and s2 >= scale
