"""GPTQ weight rounding (--weight-rounding gptq): on random data it lowers the layer-output error
below nearest rounding with integers on the same grid; on a tiny two-linear graph onnxruntime
equals the simulation; on tiny-latte the build verifies, replans to the same integers, and shares
one set of weights across the steps of an ASQ per-step build."""

import numpy as np
import onnx_graphsurgeon as gs
import pytest
import torch
from qexport.calib.collect import Collector
from qexport.exporter.fp_export import stamp
from qexport.exporter.simulate import simulated
from qexport.passes.analyze import find_groups
from qexport.passes.apply import pack_low_bit, run_passes
from qexport.passes.gptq import (
    Memo,
    Rounding,
    _divided,
    _graphed_rounder,
    _round_block,
    gptq_quantize,
    gptq_quantize_many,
    input_hessian,
    output_clipped_qparams,
)
from qexport.passes.lowrank import lowrank_factors
from qexport.passes.plan import QuantConfig, Smooth, plan_range
from qexport.passes.quant import STORAGE, Grid, dequantize, qparams, quantize
from qexport.passes.rewrite import PassConfig
from qexport.targets.catalog import ORT_CPU
from sessions import cpu_session
from test_lowrank import Tiny, _onnx, assert_runs_as_simulated

from qexport.errors import QexportError
from qexport.recipe import recipe_of

GRIDS = [
    Grid(bits=4, storage="int4", symmetric=True),
    Grid(bits=3, storage="int4", symmetric=True),
    Grid(bits=8, storage="int8", symmetric=True),
    Grid(bits=4, storage="uint8", symmetric=False),
]


def _inputs(rng, rows, mix, gain):
    """Correlated channels with skewed magnitudes, as a transformer's linear inputs are."""
    return (rng.standard_normal((rows, mix.shape[0])) @ mix) * gain


@pytest.mark.parametrize("grid", GRIDS, ids=lambda g: f"{g.storage}-{g.bits}-{'sym' if g.symmetric else 'asym'}")
@pytest.mark.parametrize("act_order", [True, False])
def test_gptq_lowers_the_layer_output_error_and_stays_on_the_grid(grid, act_order):
    rng = np.random.default_rng(0)
    n_in, n_out = 96, 40
    mix = np.eye(n_in) + 0.2 * rng.standard_normal((n_in, n_in))
    gain = np.exp(rng.normal(0.0, 1.0, n_in))
    calib, held_out = _inputs(rng, 2048, mix, gain), _inputs(rng, 2048, mix, gain)
    w = rng.standard_normal((n_in, n_out)) * 0.05
    scale, zero = qparams(w.min(0), w.max(0), grid)
    nearest = quantize(w, scale[None], zero[None], grid)
    q = gptq_quantize(w, calib.T @ calib, scale, zero, grid, act_order=act_order)

    assert q.dtype == STORAGE[grid.storage][0] and q.shape == w.shape
    assert grid.qmin <= q.min() and q.max() <= grid.qmax
    assert (q != nearest).any()

    def error(ints, x):
        return np.linalg.norm(x @ (w - dequantize(ints, scale[None], zero[None])))

    assert error(q, calib) < 0.85 * error(nearest, calib), (error(q, calib), error(nearest, calib))
    assert error(q, held_out) < 0.9 * error(nearest, held_out)  # not only on the rows it saw


@pytest.mark.parametrize("grid", GRIDS[2:], ids=lambda g: f"{g.storage}-{g.bits}")
def test_the_blocked_solve_rounds_as_the_textbook_loop(grid):
    """Rows over three blocks (BLOCK 128): the blocked torch solve's integers equal the textbook
    one-row-at-a-time loop's in numpy, with the inverse factor from numpy's Cholesky and inverse."""
    rng = np.random.default_rng(3)
    n_in, n_out = 300, 24
    x = _inputs(rng, 900, np.eye(n_in) + 0.2 * rng.standard_normal((n_in, n_in)), np.exp(rng.normal(0, 1, n_in)))
    h, w = x.T @ x, rng.standard_normal((n_in, n_out)) * 0.05
    scale, zero = qparams(w.min(0), w.max(0), grid)
    order = np.argsort(-np.diag(h), kind="stable")
    damped_h = h[np.ix_(order, order)] + np.eye(n_in) * 0.01 * np.mean(np.diag(h))
    u = np.linalg.cholesky(np.linalg.inv(damped_h)).T  # upper, (H + λI)⁻¹ = UᵀU
    rest, want = w[order].copy(), np.empty(w.shape, dtype=STORAGE[grid.storage][0])
    for i in range(n_in):
        want[order[i]] = quantize(rest[i], scale, zero, grid)
        err = (rest[i] - dequantize(want[order[i]], scale, zero)) / u[i, i]
        rest[i + 1 :] -= np.outer(u[i, i + 1 :], err)
    got = gptq_quantize(w, h, scale, zero, grid, device="cpu")
    assert np.array_equal(got, want), int((got != want).sum())


def test_layers_solved_together_round_as_each_alone():
    """A batch of three layers of one shape (their own W, H and grid parameters, one with a zero H)
    gives each the integers it gets solved alone."""
    rng = np.random.default_rng(4)
    grid = Grid(bits=8, storage="int8", symmetric=True)
    problems = []
    for k in range(3):
        x = _inputs(rng, 400, np.eye(160) + 0.3 * rng.standard_normal((160, 160)), np.exp(rng.normal(0, 1, 160)))
        w = rng.standard_normal((160, 12)) * 0.05
        scale, zero = qparams(w.min(0), w.max(0), grid)
        problems.append((w, x.T @ x if k != 1 else np.zeros((160, 160)), scale, zero))
    together = gptq_quantize_many(problems, grid)
    for problem, got in zip(problems, together, strict=True):
        assert np.array_equal(got, gptq_quantize(*problem, grid))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
@pytest.mark.parametrize("grouped", [False, True])
def test_the_graph_replayed_row_loop_rounds_as_the_eager_one_on_a_gpu(grouped):
    """On a GPU the row loop runs as one CUDA graph a block: the same integers as the eager loop,
    bit for bit, over full blocks and a shorter last one (n = 3.5 blocks)."""
    rng = np.random.default_rng(7)
    b, n, m = 3, 448, 40
    grid = Grid(bits=4, storage="int4", symmetric=True)
    x = rng.standard_normal((b, 900, n)) * np.exp(rng.normal(0, 1, n))
    h = torch.from_numpy(np.einsum("bri,brj->bij", x, x) + np.eye(n)).cuda()
    u = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    w = torch.from_numpy(rng.standard_normal((b, n, m)) * 0.05).cuda()
    amax = w.abs().amax(dim=1 if not grouped else (), keepdim=grouped).float() / grid.qmax
    s = (amax.expand(b, n, m) if grouped else amax).contiguous()
    z = torch.zeros_like(s)
    eager, graphed = torch.empty(w.shape, device="cuda"), torch.empty(w.shape, device="cuda")
    _round_block(w.clone(), u, eager, s, z, grouped, grid)
    _graphed_rounder(w.clone(), u, graphed, s, z, grouped, grid)
    assert torch.equal(eager, graphed)
    assert float(eager.abs().max()) >= grid.qmax  # rows reached the grid's edge: real rounding


def test_gptq_on_silent_channels_and_a_zero_hessian_is_finite():
    grid = GRIDS[0]
    rng = np.random.default_rng(1)
    w = rng.standard_normal((16, 8))
    scale, zero = qparams(w.min(0), w.max(0), grid)
    x = rng.standard_normal((64, 16))
    x[:, :4] = 0.0  # silent input channels: H has zero rows
    for h in (x.T @ x, np.zeros((16, 16))):
        q = gptq_quantize(w, h, scale, zero, grid)
        assert grid.qmin <= q.min() and q.max() <= grid.qmax
    # with no input at all nothing is compensated: plain rounding
    assert np.array_equal(gptq_quantize(w, np.zeros((16, 16)), scale, zero, grid), quantize(w, scale, zero, grid))


def test_input_hessian_is_the_gram_of_the_smoothed_rotated_input():
    rng = np.random.default_rng(2)
    x = rng.standard_normal((200, 8))
    s = np.exp(rng.normal(size=8))
    rot, _ = np.linalg.qr(rng.standard_normal((8, 8)))
    xr = (x / s) @ rot
    assert np.allclose(input_hessian(x.T @ x, s, rot), xr.T @ xr)
    assert np.allclose(input_hessian(x.T @ x, 1.0), x.T @ x)
    kept = torch.from_numpy(x.T @ x)  # a build's Gram matrix, kept as a tensor: the same H, bit for bit
    assert np.array_equal(input_hessian(kept, s, rot), input_hessian(x.T @ x, s, rot))
    assert np.array_equal(_divided(kept, s), (x.T @ x) / np.outer(s, s))  # a GPU's path, run on the host


def _layer(seed=3, n_in=64, n_out=24):
    rng = np.random.default_rng(seed)
    mix = np.eye(n_in) + 0.2 * rng.standard_normal((n_in, n_in))
    gain = np.exp(rng.normal(0.0, 1.0, n_in))
    x = _inputs(rng, 1024, mix, gain)
    w = rng.standard_normal((n_in, n_out)) * 0.05
    w[rng.integers(n_in, size=n_out), np.arange(n_out)] *= 6.0  # one outlier weight per channel: clipping pays
    return x, w


def test_output_clip_search_never_does_worse_than_min_max_on_the_layer_output():
    x, w = _layer()
    h, grid = x.T @ x, GRIDS[0]

    def per_channel_error(scale, zero):
        e = w - dequantize(gptq_quantize(w, h, scale, zero, grid), scale, zero)
        return ((h @ e) * e).sum(axis=0)

    scale, zero = output_clipped_qparams(w, h, grid)
    full = qparams(w.min(0), w.max(0), grid)
    assert (per_channel_error(scale, zero) <= per_channel_error(*full) * (1 + 1e-9)).all()
    assert (scale < full[0]).sum() >= 3  # some channels clip
    scale, _ = output_clipped_qparams(w, h, grid, per_channel=False)
    assert np.unique(scale).size == 1  # a per-tensor target: one ratio, one scale


def test_lowrank_weighted_by_the_hessian_fits_the_layer_output_better():
    x, w = _layer(seed=4)
    h, grid = x.T @ x, GRIDS[0]
    scale, zero = qparams(w.min(0), w.max(0), grid)
    w_dq = dequantize(gptq_quantize(w, h, scale, zero, grid), scale, zero).astype(np.float64)
    d = np.abs(x).max(axis=0)
    errors = []
    for hessian in (None, h):
        a, b = lowrank_factors(w, w_dq, d, 8, hessian)
        errors.append(np.linalg.norm(x @ (w - w_dq - a.astype(np.float64) @ b)))
    assert errors[1] < errors[0], errors


def _tiny_plan(rounding, w_bits=4, with_grams=True, memo=None, alpha=0.5):
    """Tiny fc1 -> relu -> fc2, ASQ-smoothed, planned with the given rounding; the graph as emitted."""
    torch.manual_seed(0)
    model = Tiny().eval()
    gain = torch.exp(torch.randn(16)) * torch.where(torch.arange(16) < 2, 10.0, 1.0)
    calib = [torch.randn(2, 8, 16) * gain for _ in range(8)]
    grams = {"fc1": np.zeros((16, 16)), "fc2": np.zeros((32, 32))}

    def gram(name):
        def hook(module, args):
            x = args[0].reshape(-1, args[0].shape[-1]).double().numpy()
            grams[name] += x.T @ x

        return hook

    collector = Collector({"fc1": model.fc1, "fc2": model.fc2}, steps=1, histograms=False, device=torch.device("cpu"))
    collector.samples = 2
    handles = [model.fc1.register_forward_pre_hook(gram("fc1")), model.fc2.register_forward_pre_hook(gram("fc2"))]
    with torch.no_grad():
        for x in calib:
            model(x)
    for h in handles:
        h.remove()
    stats = collector.close()
    graph = gs.import_onnx(_onnx(model))
    nodes = {"fc1": "fc1/MatMul", "fc2": "fc2/MatMul"}
    groups = find_groups(graph, nodes, {"fc1": 16, "fc2": 32})
    weights = {"fc1": np.asarray(graph.tensors()["w1"].values), "fc2": np.asarray(graph.tensors()["w2"].values)}
    biases = {"fc1": model.fc1.bias.detach().numpy(), "fc2": model.fc2.bias.detach().numpy()}
    config = QuantConfig(w_bits=w_bits, smooth=Smooth.ASQ, weight_rounding=rounding, alpha=alpha)
    plan = plan_range([0], groups, stats, weights, biases, config, ORT_CPU, grams=grams if with_grams else None,
                      gptq_memo=memo)  # fmt: skip
    graph = run_passes(graph, PassConfig(plan=plan, groups=groups, nodes=nodes), ORT_CPU)
    emitted = pack_low_bit(gs.export_onnx(graph), plan)
    stamp(emitted)
    return model, plan, emitted, gain


@pytest.mark.parametrize("w_bits", [4, 8])
def test_tiny_graph_with_gptq_weights_runs_as_simulated_and_nearer_fp(w_bits):
    model, plan, emitted, gain = _tiny_plan(Rounding.GPTQ, w_bits)
    _, near_plan, near_emitted, _ = _tiny_plan(Rounding.NEAREST, w_bits)
    for name, lp in plan.layers.items():  # same grid and scales, other integers
        assert np.array_equal(lp.w_scale, near_plan.layers[name].w_scale)
        assert lp.w_grid.qmin <= lp.w_q.min() and lp.w_q.max() <= lp.w_grid.qmax
    assert any((lp.w_q != near_plan.layers[n].w_q).any() for n, lp in plan.layers.items())
    x = torch.randn(64, 8, 16, generator=torch.Generator().manual_seed(5)) * gain

    def run(m):  # the graph's input is [2, 8, 16]: batches of two
        session = cpu_session(m.SerializeToString())
        return np.concatenate([session.run(None, {"x": x.numpy()[i : i + 2]})[0] for i in range(0, len(x), 2)])

    got, near = run(emitted), run(near_emitted)
    with torch.no_grad():
        fp = model(x).numpy()
        with simulated(model, plan):
            sim = model(x).numpy()
    assert_runs_as_simulated(got, sim)
    if w_bits == 4:  # at W8 the activation error dominates this tiny model
        assert np.linalg.norm(got - fp) < np.linalg.norm(near - fp)


def test_gptq_memo_follows_integers_moved_into_the_file():
    memo = Memo()
    _, first, _, _ = _tiny_plan(Rounding.GPTQ, memo=memo)
    views = {n: np.frombuffer(lp.w_q.tobytes(), lp.w_q.dtype).reshape(lp.w_q.shape) for n, lp in first.layers.items()}
    stranger = first.layers["fc1"].w_q.copy()  # equal values, another array: not what the memo holds
    memo.follow({"fc1": (stranger, views["fc1"])})
    _, again, _, _ = _tiny_plan(Rounding.GPTQ, memo=memo)
    assert again.layers["fc1"].w_q is first.layers["fc1"].w_q
    memo.follow({n: (lp.w_q, views[n]) for n, lp in first.layers.items()})
    _, moved, _, _ = _tiny_plan(Rounding.GPTQ, memo=memo)
    assert memo.hits == 4 and all(moved.layers[n].w_q is views[n] for n in first.layers)


def test_gptq_plan_without_grams_is_one_clear_error():
    with pytest.raises(QexportError, match="gptq has no input Gram matrix of fc1"):
        _tiny_plan(Rounding.GPTQ, with_grams=False)


def test_gptq_memo_gives_back_the_integers_of_the_same_weight_and_h_only():
    memo = Memo()
    _, first, _, _ = _tiny_plan(Rounding.GPTQ, memo=memo)
    assert memo.hits == 0
    _, again, _, _ = _tiny_plan(Rounding.GPTQ, memo=memo)  # same seed: the same weight and H
    assert memo.hits == 2 and all(again.layers[n].w_q is first.layers[n].w_q for n in first.layers)
    _, fresh, _, _ = _tiny_plan(Rounding.GPTQ)
    assert all(np.array_equal(fresh.layers[n].w_q, first.layers[n].w_q) for n in first.layers)
    _, other, _, _ = _tiny_plan(Rounding.GPTQ, memo=memo, alpha=0.9)  # another s, so another weight and H
    assert memo.hits == 2
    assert any(not np.array_equal(other.layers[n].w_q, first.layers[n].w_q) for n in first.layers)
    _, held, _, _ = _tiny_plan(Rounding.GPTQ, memo=Memo(hold=1 << 30))  # both linears solved at the end
    parking = Memo(hold=1 << 30)
    parking.park = True  # a GPU build's way: the weights wait for the solve as tensors (here on the host)
    _, parked, _, _ = _tiny_plan(Rounding.GPTQ, memo=parking)
    for n, lp in first.layers.items():
        assert np.array_equal(held.layers[n].w_q, lp.w_q) and float(held.layers[n].a_scale) == float(lp.a_scale)
        assert np.array_equal(parked.layers[n].w_q, lp.w_q) and float(parked.layers[n].a_scale) == float(lp.a_scale)


def test_tensor_hessians_and_parked_weights_round_as_host_arrays():
    """A GPU build's GPTQ inputs (H as device tensors, the weights parked on the device while they
    wait) give the integers and scales of host arrays; a parked weight leaves the host dict and
    comes back equal when the layer's plan reads it; it can no longer be scaled."""
    from qexport.passes.rangeplan import FinalWeights
    from qexport.passes.weights import gptq_weights

    rng = np.random.default_rng(5)
    weights = {f"l{i}": rng.standard_normal((24, 12)).astype(np.float32) for i in range(3)}
    x = rng.standard_normal((100, 24)) * np.exp(rng.normal(size=24))
    h = x.T @ x
    config = QuantConfig(w_bits=4, weight_rounding=Rounding.GPTQ, weight_clip="mse")
    grid = Grid(bits=4, storage=ORT_CPU.weight_type(4), symmetric=ORT_CPU.weight_symmetric)
    on_host = gptq_weights([(n, h, grid) for n in weights], FinalWeights(weights), config, ORT_CPU, Memo())
    memo, final = Memo(), FinalWeights(weights)
    memo.park = True
    tensor = torch.from_numpy(h.copy())
    as_tensors = gptq_weights([(n, tensor, grid) for n in weights], final, config, ORT_CPU, memo)
    for n in weights:
        assert all(np.array_equal(a, b) for a, b in zip(as_tensors[n], on_host[n], strict=True))
    assert set(final.parked) == set(weights) and not set(final) & set(weights)
    with pytest.raises(ValueError, match="l0: its final weight is parked"):
        final.scale_rows("l0", np.ones(24))
    assert np.array_equal(final["l0"], weights["l0"].astype(np.float64)) and "l0" not in final.parked
    again = gptq_weights([("l1", tensor, grid)], final, config, ORT_CPU, memo)  # the same weight and H: the memo's
    assert memo.hits == 1 and again["l1"][2] is as_tensors["l1"][2]


def test_weights_made_on_the_device_equal_the_host_ones():
    """A GPU build makes a waiting weight on the device (FinalWeights.park: the float32 weight sent,
    widened and scaled there), never as a host float64 copy: the values, the min-max scales and the
    GPTQ integers are the host path's, bit for bit; a layer that only GPTQ reads is never made on
    the host at all."""
    from qexport.passes.fp_weights import FPWeights, OnDevice
    from qexport.passes.rangeplan import FinalWeights
    from qexport.passes.weights import gptq_weights

    rng = np.random.default_rng(7)
    weights = {f"l{i}": rng.standard_normal((24, 12)).astype(np.float32).T.copy().T for i in range(3)}  # strided
    rows_s, cols_s = rng.uniform(0.3, 3.0, 24).astype(np.float32), rng.uniform(0.3, 3.0, 12)

    def scaled(final: FinalWeights) -> FinalWeights:
        for n in weights:
            final.scale_rows(n, rows_s)
            final.divide_columns(n, cols_s)
        return final

    host, device = scaled(FinalWeights(weights)), scaled(FinalWeights(weights))
    for n in weights:
        made = device.park(n, "cpu")
        assert made.dtype == torch.float64 and np.array_equal(made.numpy(), host[n])
        assert n not in device and not device.waiting.get(n)
    x = rng.standard_normal((100, 24)) * np.exp(rng.normal(size=24))
    h = x.T @ x
    config = QuantConfig(w_bits=4, weight_rounding=Rounding.GPTQ)
    grid = Grid(bits=4, storage=ORT_CPU.weight_type(4), symmetric=ORT_CPU.weight_symmetric)
    on_host = gptq_weights([(n, h, grid) for n in weights], scaled(FinalWeights(weights)), config, ORT_CPU, Memo())
    memo, final = Memo(), scaled(FinalWeights(weights))
    memo.park = True
    parked = gptq_weights([(n, torch.from_numpy(h.copy()), grid) for n in weights], final, config, ORT_CPU, memo)
    for n in weights:
        assert all(np.array_equal(a, b) for a, b in zip(parked[n], on_host[n], strict=True))
    assert not set(final) & set(weights) and set(final.parked) == set(weights)  # never made on the host
    # a GPU build that released the host's FP weights: made from the device-held weight, the same
    held = FPWeights({n: OnDevice(torch.from_numpy(np.ascontiguousarray(w.T))) for n, w in weights.items()})
    from_device = scaled(FinalWeights(held))
    for n in weights:
        assert np.array_equal(from_device.park(n, "cpu").numpy(), host[n])
        assert np.array_equal(held[n], weights[n]) and held.size(n) == weights[n].size


def test_gptq_build_needs_recorded_prompts(bare_stats, tmp_path):
    from qexport.exporter.build import BuildConfig, build

    recipe = recipe_of("gptq=on", "granularity.time_ranges=1")
    with pytest.raises(QexportError, match=r"does not record its prompts, which the recipe's gptq need"):
        build(bare_stats, tmp_path / "out", BuildConfig(recipe=recipe))
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_tiny_latte_gptq_tsw_shares_weights_verifies_and_replans(latte_stats, tmp_path):
    from qexport.exporter.build import BuildConfig, build, replan
    from qexport.verification.verify import verify

    result = build(latte_stats, tmp_path / "gptq", BuildConfig(recipe=recipe_of("smoothquant.mode=asq", "gptq=on")))
    nearest = build(latte_stats, tmp_path / "near", BuildConfig(recipe=recipe_of("smoothquant.mode=asq")))
    assert result.manifest["quantization"]["weight_rounding"] == "gptq"
    plans = [r.plan for r in result.ranges]
    assert len(plans) == 4
    for name, lp in plans[0].layers.items():  # H over all steps: every step has the same integers
        assert all(np.array_equal(p.layers[name].w_q, lp.w_q) for p in plans[1:]), name
    assert any((lp.w_q != nearest.ranges[0].plan.layers[n].w_q).any() for n, lp in plans[0].layers.items())
    files = result.manifest["files"]  # stored once: the same disk as nearest rounding's shared weights
    assert files["weights_bytes"] == nearest.manifest["files"]["weights_bytes"]
    assert files["weights_bytes"] < 0.4 * files["weights_bytes_without_sharing"]
    v = verify(result.folder, result.adapter, plans, result.manifest, ORT_CPU, "a red circle moving left")
    assert v.ok and all(len(m.integer) == 64 and not m.float_ for m in v.models), v.to_json()
    _, again, _ = replan(result.manifest, latte_stats)
    for old, new in zip(plans, again, strict=True):
        assert all(np.array_equal(new.layers[n].w_q, lp.w_q) for n, lp in old.layers.items())


@pytest.mark.slow
def test_tiny_latte_gptq_tsq_plans_each_range_on_its_own_steps(latte_stats, tmp_path):
    from qexport.exporter.build import BuildConfig, build

    recipe = recipe_of("bits.weights=4", "smoothquant.mode=tsq", "gptq=on", "granularity.time_ranges=2")
    result = build(latte_stats, tmp_path / "tsq", BuildConfig(recipe=recipe))
    first, second = (r.plan.layers for r in result.ranges)
    assert any((first[n].w_q != second[n].w_q).any() for n in first)
    assert all(lp.w_grid.qmin <= lp.w_q.min() and lp.w_q.max() <= lp.w_grid.qmax for lp in first.values())


@pytest.mark.slow
def test_tiny_latte_gptq_with_asq_alpha_auto_rounds_every_candidate_with_h(latte_stats, tmp_path):
    from qexport.exporter.build import BuildConfig, build
    from qexport.exporter.search import ALPHAS

    recipe = recipe_of("smoothquant.mode=asq", "smoothquant.alpha=auto", "gptq=on", "granularity.time_ranges=2")
    result = build(latte_stats, tmp_path / "auto", BuildConfig(recipe=recipe))
    alphas = {r["alpha"] for r in result.manifest["ranges"]}
    assert len(alphas) == 1 and alphas <= set(ALPHAS)  # one alpha for all ranges: weights still shared
    first, second = (r.plan.layers for r in result.ranges)
    assert all(np.array_equal(first[n].w_q, second[n].w_q) for n in first)


@pytest.mark.slow
def test_tsq_alpha_auto_scores_nearest_rounding_and_rounds_the_chosen_alpha_by_gptq(latte_stats, tmp_path):
    # the per-range alpha search scores each candidate with nearest rounding; the plan it emits is
    # GPTQ's for the chosen alpha, as a build with that alpha fixed makes it
    from qexport.exporter.build import BuildConfig, build

    searched = build(latte_stats, tmp_path / "auto", BuildConfig(recipe=recipe_of(
        "smoothquant.mode=tsq", "smoothquant.alpha=auto", "gptq=on", "granularity.time_ranges=1")))  # fmt: skip
    (chosen,) = {r["alpha"] for r in searched.manifest["ranges"]}
    fixed = build(latte_stats, tmp_path / "fixed", BuildConfig(recipe=recipe_of(
        "smoothquant.mode=tsq", f"smoothquant.alpha={chosen}", "gptq=on", "granularity.time_ranges=1")))  # fmt: skip
    nearest = build(latte_stats, tmp_path / "nearest", BuildConfig(recipe=recipe_of(
        "smoothquant.mode=tsq", f"smoothquant.alpha={chosen}", "granularity.time_ranges=1")))  # fmt: skip
    got, want, plain = (b.ranges[0].plan.layers for b in (searched, fixed, nearest))
    assert all(np.array_equal(got[n].w_q, want[n].w_q) for n in want)
    assert any(not np.array_equal(got[n].w_q, plain[n].w_q) for n in plain)


@pytest.mark.slow
def test_alpha_scoring_gptq_scores_each_candidate_as_it_will_be_rounded(latte_stats, tmp_path):
    # gptq.alpha_scoring gptq: each alpha candidate is scored with its GPTQ-rounded weights (other
    # scores than nearest rounding gives), and the emitted plan is the chosen candidate's, the same
    # integers as a build with that alpha fixed
    from qexport.exporter.build import BuildConfig, build

    base = ("smoothquant.mode=tsq", "smoothquant.alpha=auto", "gptq=on", "granularity.time_ranges=1")
    nearest = build(latte_stats, tmp_path / "nearest", BuildConfig(recipe=recipe_of(*base)))
    scored = build(latte_stats, tmp_path / "gptq", BuildConfig(recipe=recipe_of(*base, "gptq.alpha_scoring=gptq")))
    by_nearest, by_gptq = (b.ranges[0].plan.scores["alpha"] for b in (nearest, scored))
    both = set(by_nearest) & set(by_gptq)
    assert both and all(by_nearest[a] != by_gptq[a] for a in both)
    (chosen,) = {r["alpha"] for r in scored.manifest["ranges"]}
    assert by_gptq[chosen] == max(by_gptq.values())
    fixed = build(latte_stats, tmp_path / "fixed", BuildConfig(recipe=recipe_of(
        "smoothquant.mode=tsq", f"smoothquant.alpha={chosen}", "gptq=on", "granularity.time_ranges=1")))  # fmt: skip
    got, want = (b.ranges[0].plan.layers for b in (scored, fixed))
    assert all(np.array_equal(got[n].w_q, want[n].w_q) for n in want)


def test_digest_keys_dtype_shape_and_every_byte():
    """The memo's key: equal for equal content in any layout, apart for another shape or dtype of
    the same bytes, and apart when any one element of a multi-chunk array changes (each chunk, and
    bytes that are not a whole 8-byte word)."""
    from qexport.passes.gptq import _WORDS, _folded, digest

    rng = np.random.default_rng(0)
    a = rng.standard_normal((8, 8))
    assert digest(a[:, ::2], "x") == digest(a[:, ::2].copy(), "x") != digest(a[:, ::2].copy(), "y")
    assert digest(np.zeros((0, 3))) != digest(np.zeros((3, 0)))
    b = np.arange(6, dtype=np.float32)
    assert len({digest(b), digest(b.reshape(2, 3)), digest(b.view(np.int32))}) == 3
    big = rng.standard_normal(2 * _WORDS + 3)  # float64: two whole chunks of words and part of a third
    keys = {digest(big)}
    for i in (0, _WORDS - 1, _WORDS, 2 * _WORDS, big.size - 1):
        changed = big.copy()
        changed[i] = np.nextafter(changed[i], np.inf)
        keys.add(digest(changed))
    assert len(keys) == 6
    assert _folded(torch.from_numpy(big)) == _folded(big)  # a tensor folds as its bytes do, chunk by chunk
    assert _folded(torch.zeros(0)) == _folded(np.zeros(0)) == b""
    odd = np.frombuffer(rng.bytes(13), dtype=np.uint8)
    assert digest(odd) != digest(np.concatenate([odd[:-1], odd[-1:] ^ np.uint8(1)]))


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a GPU"))])  # fmt: skip
def test_a_tensor_folds_on_its_device_to_the_bytes_numpy_folds(monkeypatch, device):
    """A GPU build keys its parked weights and H where they are: int64 products and sums there wrap
    as numpy's uint64 ones do, in any batch of chunks, with a tail, from a strided view."""
    from qexport.passes import gptq
    from qexport.passes.gptq import _WORDS, _folded

    rng = np.random.default_rng(1)
    words = rng.integers(0, 2**64, 3 * _WORDS + 5, dtype=np.uint64)  # every bit pattern: the sums wrap
    odd = rng.standard_normal(2 * _WORDS * 2 + 3).astype(np.float32)  # a 4-byte tail after the words
    wide = rng.standard_normal((64, 2 * _WORDS // 32))
    cases = (
        (words, torch.from_numpy(words)),
        (odd, torch.from_numpy(odd)),
        (wide[:, ::2], torch.from_numpy(wide)[:, ::2]),
    )
    for chunks in (16, 1):  # several at once, one chunk at a time
        monkeypatch.setattr(gptq, "FOLD_CHUNKS", chunks)
        for host, tensor in cases:
            assert _folded(tensor.to(device)) == _folded(np.ascontiguousarray(host))
            assert gptq._folded_tensor(tensor) == _folded(np.ascontiguousarray(host))  # its device code, on the CPU
