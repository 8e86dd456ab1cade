"""Per-head Hadamard rotation (--rotate): the constructions are orthonormal, the fold around
attention is exact per head (and would not be across heads), and it spreads an outlier channel."""

import numpy as np
import pytest
from qexport.passes.analyze import Group
from qexport.passes.rotate import hadamard, head_rotation, rotated_range
from qexport.passes.techniques.head_rotation import fold_head_rotation
from sessions import cpu_session

from qexport.errors import QexportError
from qexport.recipe import recipe_of

HEADS, DH = 4, 12
C = HEADS * DH


@pytest.mark.parametrize("n", [1, 2, 12, 16, 20, 48, 64, 72, 128])
def test_hadamard_is_orthonormal_with_equal_magnitudes(n):
    h = hadamard(n)
    assert np.allclose(h @ h.T, np.eye(n), atol=1e-12) and np.allclose(np.abs(h), 1 / np.sqrt(n))


def test_sizes_without_a_construction_are_refused():
    with pytest.raises(QexportError, match="no Hadamard construction for size 36"):
        hadamard(36)
    with pytest.raises(QexportError, match="cannot rotate 50 channels in heads of 12"):
        head_rotation(50, 12)


def _attention(x, ctx, w, b):
    """Multi-head attention with W^T [in, out] weights, heads of DH consecutive channels."""
    q, k, v = (inp @ w[n] + b[n] for inp, n in ((x, "q"), (ctx, "k"), (ctx, "v")))
    out = np.empty_like(q)
    for h in range(HEADS):
        cols = slice(h * DH, (h + 1) * DH)
        logits = q[:, cols] @ k[:, cols].T / np.sqrt(DH)
        p = np.exp(logits - logits.max(1, keepdims=True))
        out[:, cols] = (p / p.sum(1, keepdims=True)) @ v[:, cols]
    return out @ w["o"] + b["o"], out


def test_fold_is_exact_per_head_and_spreads_outliers():
    rng = np.random.default_rng(0)
    x, ctx = rng.standard_normal((10, C)), rng.standard_normal((7, C))
    w = {n: rng.standard_normal((C, C)) / np.sqrt(C) for n in "qkvo"}
    b = {n: rng.standard_normal(C) for n in "qkvo"}
    w["v"][:, 5] *= 30.0  # one loud channel in V, hence in the attention output
    b["v"][5] = 20.0
    ref, o = _attention(x, ctx, w, b)
    group = Group(tensor="o_in", layers=("o",), channels=C, fold="value", value_layer="v")
    final_w, final_b = dict(w), dict(b)
    rot = fold_head_rotation(group, {"o": DH}, final_w, final_b, set())
    got, o_rot = _attention(x, ctx, final_w, final_b)
    assert np.abs(got - ref).max() < 1e-10, "the per-head rotation must leave the function unchanged"
    assert np.allclose(o_rot, o @ rot)  # the output linear now reads O·R
    assert np.abs(o_rot).max() < 0.5 * np.abs(o).max()  # the loud channel is spread over its head
    across = dict(w, v=w["v"] @ hadamard(C), o=hadamard(C).T @ w["o"])  # one block across heads
    assert np.abs(_attention(x, ctx, across, dict(b, v=b["v"] @ hadamard(C)))[0] - ref).max() > 1e-3
    _, hi, magnitude, rotated = rotated_range(o, rot, lo=2 * o.min(), hi=2 * o.max())
    assert np.allclose(rotated, o @ rot) and magnitude.shape == (C,)
    assert hi == pytest.approx(2 * max(o.max(), -o.min()) / np.abs(o).max() * (o @ rot).max())
    with pytest.raises(QexportError, match="head size of o"):
        fold_head_rotation(group, {}, dict(w), dict(b), set())


@pytest.mark.slow
@pytest.mark.parametrize("smooth", ["none", "asq"])
def test_rotation_folds_exactly_in_the_tiny_latte_graph(latte_fp, smooth):
    import onnx_graphsurgeon as gs
    from qexport.exporter.build import head_dims, range_inputs
    from qexport.exporter.fp_export import StepGraphs, load_graph
    from qexport.passes.plan import QuantConfig, Smooth, plan_range
    from qexport.passes.rewrite import PassConfig
    from qexport.passes.techniques.head_rotation import fold_rotation
    from qexport.passes.techniques.smoothquant import fold_smoothing
    from qexport.targets.catalog import ORT_CPU

    adapter, stats, fp, feeds = latte_fp
    graph = StepGraphs(load_graph(fp)).at(749)
    reference = gs.export_onnx(graph.copy())
    nodes, groups, weights, biases = range_inputs(graph, fp.bindings, adapter)
    rng = np.random.default_rng(0)
    samples = {g.layers[0]: rng.standard_normal((64, g.channels)) for g in groups if g.fold == "value"}
    config = QuantConfig(smooth=Smooth(smooth), rotate=True)
    plan = plan_range([1], groups, stats.layers, weights, biases, config, ORT_CPU, keep_float=True,
                      samples=samples, head_dims=head_dims(adapter, groups))  # fmt: skip
    assert len(plan.rotations) == len(samples) == 12
    pc = PassConfig(plan=plan, groups=groups, nodes=nodes)
    folded = fold_rotation(fold_smoothing(graph, pc, ORT_CPU), pc, ORT_CPU)
    for n, b in fp.bindings.items():
        folded.tensors()[b.weight].values = plan.layers[n].w_float
    run = lambda m: cpu_session(m.SerializeToString()).run(None, feeds)[0]  # noqa: E731
    ref, got = run(reference), run(gs.export_onnx(folded.cleanup().toposort()))
    assert np.abs(got - ref).max() <= 1e-4 * np.abs(ref).max(), np.abs(got - ref).max()


@pytest.mark.slow
def test_tiny_latte_rotated_build_fuses_verifies_and_replans(latte_stats, tmp_path):
    from qexport.exporter.build import BuildConfig, build, replan
    from qexport.targets.catalog import ORT_CPU
    from qexport.verification.verify import verify

    config = BuildConfig(recipe=recipe_of("smoothquant.mode=asq", "head_rotation=on", "granularity.time_ranges=1"))
    result = build(latte_stats, tmp_path / "rot", config)
    assert result.manifest["quantization"]["rotated_groups"] == 12
    plan = result.ranges[0].plan
    v = verify(result.folder, result.adapter, [plan], result.manifest, ORT_CPU, "a red circle moving left")
    assert v.ok and all(len(m.integer) == 64 and not m.float_ for m in v.models), v.to_json()
    _, plans, _ = replan(result.manifest, latte_stats)
    assert all(np.array_equal(plans[0].layers[n].w_q, lp.w_q) for n, lp in plan.layers.items())
    assert all(float(plans[0].layers[n].a_scale) == float(lp.a_scale) for n, lp in plan.layers.items())
