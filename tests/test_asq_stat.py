"""--asq-stat: how ASQ aggregates each channel's activation magnitude over the steps (running
average or largest per-step mean), refused without ASQ, recorded and replanned."""

import numpy as np
import pytest
from qexport.calib.store import load
from qexport.exporter.build import BuildConfig, build, replan

from qexport.errors import QexportError
from qexport.recipe import recipe_of


def test_asq_stat_is_checked():
    with pytest.raises(QexportError, match=r"'smoothquant.statistic' 'max' is ASQ's; it needs mode 'asq'"):
        recipe_of("smoothquant.mode=tsq", "smoothquant.statistic=max")
    with pytest.raises(QexportError, match=r"statistic' must be one of 'ema', 'max', 'range', got 'mean'"):
        recipe_of("smoothquant.mode=asq", "smoothquant.statistic=mean")


def test_max_smooths_by_each_channels_largest_step_and_replans(latte_stats, tmp_path):
    stats = load(latte_stats)

    def smoothing(stat):
        recipe = recipe_of("smoothquant.mode=asq", f"smoothquant.statistic={stat}", "granularity.time_ranges=1")
        return build(latte_stats, tmp_path / stat, BuildConfig(recipe=recipe))

    ema, top = smoothing("ema"), smoothing("max")
    assert (ema.manifest["quantization"]["asq_stat"], top.manifest["quantization"]["asq_stat"]) == ("ema", "max")
    old, new = ema.ranges[0].plan.layers, top.ranges[0].plan.layers
    divided = [name for name, lp in new.items() if lp.divisor is not None]  # s divides the layer's input
    assert len(divided) >= len(new) // 2
    for name in divided:  # alpha 0.5, same weights: s_max / s_ema = (a_max / a_ema)^0.5
        layer = stats.layers[name]
        expected = np.sqrt(np.maximum(layer.absmax_mean.max(0), 1e-8) / np.maximum(layer.asq, 1e-8))
        np.testing.assert_allclose(new[name].divisor / old[name].divisor, expected, rtol=1e-5)
        assert (expected >= 1 - 1e-6).mean() > 0.9  # the largest step is at least the average, mostly
    s_max = top.ranges[0].plan.smooth
    _, plans, _ = replan(top.manifest, latte_stats)
    assert all(np.array_equal(plans[0].smooth[g], s_max[g]) for g in s_max)
