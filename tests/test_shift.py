"""Channel shift (--channel-shift): the midpoints and the shifted range from per-channel extremes,
the refusals, the fold is exact in FP on the tiny-latte graph, and a per-step build verifies on
integer kernels with its weights shared and replans to the same biases."""

import numpy as np
import pytest
from qexport.calib.stats import LayerStats
from qexport.passes.analyze import Group
from qexport.passes.plan import QuantConfig, Smooth
from qexport.passes.techniques.shift import ChannelShift, can_shift, channel_shift, shift_fold, shifted_range, shifts_of
from sessions import cpu_session

from qexport.errors import QexportError
from qexport.recipe import recipe_of


def _stats(lo: np.ndarray, hi: np.ndarray) -> LayerStats:
    steps, channels = lo.shape
    return LayerStats(channels=channels, minimum=lo.min(1), maximum=hi.max(1), channel_min=lo, channel_max=hi,
                      absmax_sum=np.maximum(-lo, hi).astype(np.float64), count=np.ones(steps, dtype=np.int64),
                      asq_z=np.zeros(channels), asq_n=0)  # fmt: skip


def test_midpoints_centre_every_channel_and_narrow_the_tensor_range():
    lo = np.array([[0.0, -4.0, 2.0], [-1.0, -6.0, 3.0]], dtype=np.float32)
    hi = np.array([[2.0, -2.0, 8.0], [1.0, -3.0, 9.0]], dtype=np.float32)
    st = _stats(lo, hi)
    z = channel_shift(st, [0, 1], 1.0)
    assert np.allclose(z, [0.5, -4.0, 5.5])  # (min over steps + max over steps) / 2
    low, high = shifted_range(st, [0, 1], 1.0, z)
    assert (low, high) == (-3.5, 3.5)  # the widest channel's half-width (channel 2: 2..9)
    assert high - low < float(hi.max() - lo.min())  # 7 against 15 unshifted
    z1 = channel_shift(st, [1], np.array([1.0, 2.0, 1.0]))  # per step, in the smoothed domain
    assert np.allclose(z1, [0.0, -2.25, 6.0])
    assert shifted_range(st, [1], np.array([1.0, 2.0, 1.0]), z1) == (-3.0, 3.0)


def test_asq_range_statistic_is_the_running_average_of_half_widths():
    from qexport.passes.smoothing import act_stat, running_average

    lo = np.array([[-1.0, 0.0], [-3.0, 2.0], [np.inf, np.inf]], dtype=np.float32)  # step 2: no samples
    hi = np.array([[1.0, 4.0], [1.0, 3.0], [-np.inf, -np.inf]], dtype=np.float32)
    st = _stats(lo, hi)
    half = np.array([[1.0, 2.0], [2.0, 0.5]])
    ema = (0.95 * 0.05 * half[0] + 0.05 * half[1]) / (1 - 0.95**2)  # zero-initialised, bias-corrected
    assert np.allclose(running_average((hi - lo).astype(np.float64) / 2), ema)
    assert np.allclose(act_stat(st, [0, 1], Smooth.ASQ, "range"), ema)
    assert not np.allclose(act_stat(st, [0, 1], Smooth.ASQ, "range"), half.mean(0))  # later steps weigh more


def test_groups_without_the_restoring_bias_are_not_shifted():
    g = Group(tensor="x", layers=("a", "b"), channels=3, fold="explicit")
    assert can_shift(g, {"a": np.zeros(2), "b": np.zeros(2)})
    assert not can_shift(g, {"a": np.zeros(2), "b": None})
    out = Group(tensor="o", layers=("o",), channels=3, fold="value", value_layer="v")
    assert not can_shift(out, {"o": np.zeros(3), "v": None}) and can_shift(out, {"o": np.zeros(3), "v": np.zeros(3)})
    assert shift_fold(out) == "value" and shift_fold(g) == "explicit"
    runtime = Group(tensor="m", layers=("q",), channels=3, fold="modulation")  # modulation computed at run time
    assert shift_fold(runtime) == "explicit"
    assert shift_fold(Group(tensor="m", layers=("q",), channels=3, fold="modulation", scale_const="s",
                            shift_const="t")) == "modulation"  # fmt: skip


@pytest.mark.parametrize("other", ["head_rotation=on", "online_rotation=on", "lowrank.rank=8", "attention=on"])
def test_shift_refuses_techniques_it_does_not_combine_with(other):
    with pytest.raises(QexportError, match="technique 'channel_shift' does not combine with"):
        recipe_of("smoothquant.mode=asq", "channel_shift=on", other)


@pytest.mark.slow
@pytest.mark.parametrize("smooth", ["none", "asq"])
def test_shift_folds_exactly_in_the_tiny_latte_graph(latte_fp, smooth):
    import onnx_graphsurgeon as gs
    from qexport.exporter.build import range_inputs
    from qexport.exporter.fp_export import StepGraphs, load_graph
    from qexport.passes.plan import plan_range
    from qexport.passes.rewrite import PassConfig
    from qexport.passes.techniques.shift import insert_shift
    from qexport.passes.techniques.smoothquant import fold_smoothing
    from qexport.targets.catalog import ORT_CPU

    adapter, stats, fp, feeds = latte_fp
    outputs = []
    for shift in (False, True):  # the same plan with and without the shift, weights = dequantized integers
        graph = StepGraphs(load_graph(fp)).at(749)
        nodes, groups, weights, biases = range_inputs(graph, fp.bindings, adapter)
        config = QuantConfig(smooth=Smooth(smooth), techniques={"channel_shift": ChannelShift()} if shift else {})
        plan = plan_range([1], groups, stats.layers, weights, biases, config, ORT_CPU)
        pc = PassConfig(plan=plan, groups=groups, nodes=nodes)
        graph = insert_shift(fold_smoothing(graph, pc, ORT_CPU), pc, ORT_CPU)
        for n, b in fp.bindings.items():
            graph.tensors()[b.weight].values = plan.layers[n].weight().astype(np.float32)
        model = gs.export_onnx(graph.cleanup().toposort())
        session = cpu_session(model.SerializeToString())
        outputs.append((plan, session.run(None, feeds)[0]))
    (plain, ref), (shifted, got) = outputs
    assert shifts_of(shifted).folds == {"explicit": 13, "modulation": 16, "value": 12}
    assert all(np.array_equal(shifted.layers[n].w_q, lp.w_q) for n, lp in plain.layers.items())  # weights kept
    assert np.abs(got - ref).max() <= 1e-5 * np.abs(ref).max(), np.abs(got - ref).max()
    narrower = [float(shifted.layers[n].a_scale) <= float(lp.a_scale) * (1 + 1e-6) for n, lp in plain.layers.items()]
    assert all(narrower)  # centring never widens a tensor's range


@pytest.mark.slow
def test_per_step_shift_build_verifies_shares_weights_and_replans(latte_stats, tmp_path):
    from qexport.exporter.build import BuildConfig, build, replan
    from qexport.targets.catalog import ORT_CPU
    from qexport.verification.verify import verify

    from qexport.summaries import build_lines

    config = BuildConfig(recipe=recipe_of("smoothquant.mode=asq", "channel_shift=on"))
    result = build(latte_stats, tmp_path / "shift", config)
    q = result.manifest["quantization"]
    assert q["channel_shift"] == {"on": True, "folds": {"explicit": 13, "modulation": 16, "value": 12}}
    lines = build_lines(result.manifest, 1.0, "x")
    assert any(line.startswith("  shift      channel shift per range") for line in lines)
    plans = [r.plan for r in result.ranges]
    first, last = plans[0], plans[-1]
    assert all(np.array_equal(first.layers[n].w_q, lp.w_q) for n, lp in last.layers.items())  # shared weights
    assert any(not np.allclose(shifts_of(first).z[t], z) for t, z in shifts_of(last).z.items())  # z differs per step
    files = result.manifest["files"]
    assert files["weights_bytes"] < 0.5 * files["weights_bytes_without_sharing"]
    v = verify(result.folder, result.adapter, plans, result.manifest, ORT_CPU, "a red circle moving left")
    assert v.ok and all(len(m.integer) == 64 and not m.float_ for m in v.models), v.to_json()
    _, again, _ = replan(result.manifest, latte_stats)
    for old, new in zip(plans, again, strict=True):
        for n, lp in old.layers.items():
            assert (lp.bias is None) == (new.layers[n].bias is None)
            assert lp.bias is None or np.array_equal(lp.bias, new.layers[n].bias)


def test_smooth_ranges_are_checked():
    from qexport.passes.smoothing import smoothing_steps

    assert (
        smoothing_steps([3], 4, 0) == [3]
        and smoothing_steps([1], 4, 2) == [0, 1]
        and smoothing_steps([2], 4, 2) == [2, 3]
    )
    assert smoothing_steps([4], 10, 3) == [4, 5, 6]  # np.array_split: 4, 3, 3
    with pytest.raises(QexportError, match=r"'smoothquant.shared_ranges' must be in 1\.\.4"):
        smoothing_steps([0], 4, 5)
    for bad in (["smoothquant.mode=asq"], ["smoothquant.mode=tsq", "smoothquant.alpha=auto"],
                ["smoothquant.mode=tsq", "granularity.time_ranges=2"]):  # fmt: skip
        with pytest.raises(QexportError, match=r"'smoothquant.shared_ranges' gives TSQ one smoothing vector"):
            recipe_of("smoothquant.shared_ranges=2", *bad)


@pytest.mark.slow
def test_tsq_smooth_ranges_share_weights_within_a_range_and_replan(latte_stats, tmp_path):
    from qexport.exporter.build import BuildConfig, build, replan

    from qexport.summaries import build_lines

    config = BuildConfig(recipe=recipe_of("smoothquant.mode=tsq", "smoothquant.shared_ranges=2"))
    result = build(latte_stats, tmp_path / "sr", config, progress=None)
    plans = [r.plan for r in result.ranges]
    assert len(plans) == 4 and result.manifest["quantization"]["smooth_ranges"] == 2
    same = lambda a, b: all(np.array_equal(a.layers[n].w_q, lp.w_q) for n, lp in b.layers.items())  # noqa: E731
    assert same(plans[0], plans[1]) and same(plans[2], plans[3]) and not same(plans[1], plans[2])
    assert any(not np.array_equal(plans[0].layers[n].a_scale, lp.a_scale) for n, lp in plans[1].layers.items())
    files = result.manifest["files"]
    assert files["weights_bytes"] < 0.6 * files["weights_bytes_without_sharing"]  # two weight sets of four
    assert any("shared_ranges 2" in line for line in build_lines(result.manifest, 1.0, "x"))
    _, again, _ = replan(result.manifest, latte_stats)
    assert all(same(a, b) for a, b in zip(plans, again, strict=True))
