"""--asq-stat: how ASQ aggregates each channel's activation magnitude over the steps (running
average or largest per-step mean), refused without ASQ, recorded and replanned."""

import numpy as np
import pytest
from qexport.calib.store import load
from qexport.exporter.build import BuildConfig, build, replan

from qexport.errors import QexportError
from qexport.recipe import load_recipe, recipe_of


def test_asq_stat_is_checked():
    with pytest.raises(QexportError, match=r"'smoothquant.statistic' 'max' is ASQ's; it needs mode 'asq'"):
        recipe_of("smoothquant.mode=tsq", "smoothquant.statistic=max")
    with pytest.raises(QexportError, match=r"statistic' must be one of 'ema', 'max', 'range', 'spearman', got 'mean'"):
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


def test_spearman_ranks_ties_by_their_mean_rank():
    from qexport.passes.smoothing import ranks, spearman

    assert ranks(np.array([3.0, 1.0, 3.0, 2.0])).tolist() == [3.5, 1.0, 3.5, 2.0]
    assert spearman(np.arange(6.0), np.arange(6.0) ** 3) == pytest.approx(1.0)
    assert spearman(np.arange(6.0), -np.arange(6.0)) == pytest.approx(-1.0)
    assert spearman(np.ones(4), np.arange(4.0)) == 0.0


def test_salience_calibration_weighs_steps_by_softmax_of_minus_rho(latte_stats):
    from qexport.passes.smoothing import salience_calibrated, spearman

    stats = load(latte_stats)
    layer = next(iter(stats.layers.values()))
    per_step = layer.absmax_sum / layer.count[:, None]
    wmax = per_step[0]  # step 0's salience: rho 1 for it, lower for the others
    rho = np.array([spearman(a, wmax) for a in per_step])
    w = np.exp(-rho) / np.exp(-rho).sum()
    np.testing.assert_allclose(salience_calibrated(layer, list(range(layer.steps)), wmax), w @ per_step)
    assert rho[0] == pytest.approx(1.0) and w[0] == w.min()


@pytest.mark.slow  # a build
def test_ptq4dit_preset_is_csb_at_half_with_the_calibrated_salience(latte_stats, tmp_path):
    from qexport.passes.smoothing import salience_calibrated, smoothing_vector

    result = build(latte_stats, tmp_path / "p", BuildConfig(recipe=load_recipe("w8a8-ptq4dit")))
    stats, plan = load(latte_stats), result.ranges[0].plan
    layer = "transformer_blocks.0.attn1.to_q"
    weights = [result.adapter.transformer.get_submodule(f"transformer_blocks.0.attn1.to_{k}").weight for k in "qkv"]
    wmax = np.max([w.detach().abs().numpy().max(axis=0) for w in weights], axis=0)
    want = smoothing_vector(salience_calibrated(stats.layers[layer], list(range(stats.layers[layer].steps)), wmax),
                            wmax, 0.5)  # fmt: skip
    np.testing.assert_allclose(plan.layers[layer].divisor, want, rtol=1e-6)  # q, k, v share it
    assert result.manifest["quantization"]["asq_stat"] == "spearman"
