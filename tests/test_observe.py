"""Activation observers: MSE and percentile ranges on known distributions, and a build that
uses them from replayed calibration prompts, re-derived exactly by verify's replan."""

import numpy as np
import pytest
from qexport.exporter.build import BuildConfig, build, replan
from qexport.passes.observe import Observer, histogram, mse_range, observe, range_error
from qexport.passes.quant import Grid

from qexport.errors import QexportError
from qexport.recipe import recipe_of

U8 = Grid(bits=8, storage="uint8", symmetric=False)
S8 = Grid(bits=8, storage="int8", symmetric=True)


def _error(values, lo, hi, grid):
    centres, counts = histogram(values, values.min(), values.max())
    return range_error(centres, counts, lo, hi, grid, False)


def test_mse_clips_a_rare_outlier_and_lowers_the_error():
    values = np.concatenate([np.random.default_rng(0).uniform(-1.0, 1.0, size=1_000_000), [10.0]])
    lo, hi = float(values.min()), float(values.max())
    c_lo, c_hi = mse_range(values, lo, hi, U8)
    assert c_lo == lo and 1.0 < c_hi < 0.6 * hi  # clipping the outlier costs less than a coarser grid
    assert _error(values, c_lo, c_hi, U8) < 0.6 * _error(values, lo, hi, U8)


def test_mse_keeps_a_heavy_tail_that_clipping_would_cost_more():
    values = np.random.default_rng(4).standard_t(3, size=200_000)
    lo, hi = float(values.min()), float(values.max())
    c_lo, c_hi = mse_range(values, lo, hi, U8)
    assert c_hi > 0.5 * hi and c_lo < 0.5 * lo
    assert _error(values, c_lo, c_hi, U8) <= _error(values, lo, hi, U8)


def test_mse_keeps_the_full_range_of_a_uniform_tensor():
    values = np.random.default_rng(1).uniform(-1.0, 3.0, size=100_000)
    c_lo, c_hi = mse_range(values, float(values.min()), float(values.max()), U8)
    assert c_lo <= -0.97 and c_hi >= 2.9


def test_mse_on_a_symmetric_grid_shrinks_both_ends_alike():
    values = np.random.default_rng(2).laplace(size=50_000)
    lo, hi = float(values.min()), float(values.max())
    c_lo, c_hi = mse_range(values, lo, hi, S8)
    assert c_lo / lo == pytest.approx(c_hi / hi)


def test_percentile_clips_isolated_outliers_only():
    values = np.concatenate([np.random.default_rng(3).normal(size=100_000), [80.0, -60.0]])
    c_lo, c_hi = observe(values, -60.0, 80.0, U8, Observer.PERCENTILE)
    assert -5 < c_lo < -3 and 3 < c_hi < 5
    assert observe(None, -60.0, 80.0, U8, Observer.MINMAX) == (-60.0, 80.0)
    with pytest.raises(ValueError, match="needs samples"):
        observe(None, -1.0, 1.0, U8, Observer.MSE)


@pytest.mark.slow
def test_build_with_mse_observer_narrows_ranges_and_replans_exactly(latte_stats, tmp_path):
    base_recipe = recipe_of("smoothquant.mode=asq", "granularity.time_ranges=1")
    base = build(latte_stats, tmp_path / "minmax", BuildConfig(recipe=base_recipe))
    recipe = recipe_of("activation_observer.method=mse", base=base_recipe)
    result = build(latte_stats, tmp_path / "mse", BuildConfig(recipe=recipe))
    assert result.manifest["quantization"]["act_observer"] == "mse"
    old, new = base.ranges[0].plan.layers, result.ranges[0].plan.layers
    narrower = [name for name in new if float(new[name].a_scale) < float(old[name].a_scale)]
    assert all(float(new[n].a_scale) <= float(old[n].a_scale) * (1 + 1e-6) for n in new)  # never wider
    assert len(narrower) >= len(new) // 4
    _, plans, _ = replan(result.manifest, latte_stats)
    assert all(float(plans[0].layers[n].a_scale) == float(new[n].a_scale) for n in new)


@pytest.mark.parametrize("observer", [Observer.PERCENTILE, Observer.SEARCH])
def test_observers_need_recorded_prompts(bare_stats, tmp_path, observer):
    recipe = recipe_of(f"activation_observer.method={observer}", "granularity.time_ranges=1")
    with pytest.raises(QexportError, match="does not record its prompts, which the recipe's activation_observer need"):
        build(bare_stats, tmp_path / "out", BuildConfig(recipe=recipe))
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_searches_score_quantized_plans_against_fp_and_replan(latte_stats, tmp_path):
    from qexport.exporter.search import SHRINKS

    recipe = recipe_of("smoothquant.mode=tsq", "smoothquant.alpha=auto", "activation_observer.method=search",
                       "granularity.time_ranges=2", "gptq=on")  # fmt: skip
    result = build(latte_stats, tmp_path / "search", BuildConfig(recipe=recipe))
    ranges = result.manifest["ranges"]
    for index, r in enumerate(ranges):
        assert r["act_shrink"] in SHRINKS
        tried = r["search_sqnr_db"]
        if index == 0:  # the coarse pass, then a climb
            assert {"0.1", "0.4", "0.7", "1.0"} <= set(tried["alpha"])
        else:  # a climb from the previous range's alpha
            assert str(ranges[index - 1]["alpha"]) in tried["alpha"] and len(tried["alpha"]) < 10
        assert {"1.0", "0.94", "0.87", "0.75"} <= set(tried["act_shrink"])  # the range search: coarse to fine
        scores = [v for s in tried.values() for v in s.values()]
        assert 6 <= len(scores) <= 20 and all(0 < v < 80 for v in scores)  # quantized vs FP: finite, not identical
    _, plans, _ = replan(result.manifest, latte_stats)
    for old, new in zip(result.ranges, plans, strict=True):  # planned afresh at the chosen alpha and ratio:
        assert (new.alpha, new.act_shrink) == (old.plan.alpha, old.plan.act_shrink)  # the same as the search's
        for n, lp in new.layers.items():  # plan, whose weights the ratios shared (GPTQ's integers included)
            built = old.plan.layers[n]
            assert float(lp.a_scale) == float(built.a_scale) and float(lp.a_zero) == float(built.a_zero)
            assert np.array_equal(lp.w_q, built.w_q) and np.array_equal(lp.w_scale, built.w_scale)
