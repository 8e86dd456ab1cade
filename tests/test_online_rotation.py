"""Online Hadamard rotation (build --online-rotation) and DuQuant's dual transformation in its
place: exact in FP, integer kernels kept, the adaptive choice follows its criterion."""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs
import pytest
from qexport.passes.plan import QuantConfig, Smooth
from qexport.passes.quant import Grid
from qexport.passes.rotate import _zigzag, compose_duquant, duquant_factors, hadamard
from qexport.passes.techniques.online_rotation import choose_online
from qexport.targets.catalog import get_profile
from sessions import cpu_session

from qexport.errors import QexportError
from qexport.recipe import recipe_of

TARGET = get_profile("ort-cpu")
W8 = Grid(bits=8, storage="int8", symmetric=True)
A8 = Grid(bits=8, storage="uint8", symmetric=False, narrow=False)


def _inputs(outlier: float, seed: int = 0) -> tuple[np.ndarray, list[np.ndarray]]:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(4096, 128)).astype(np.float32)
    x[:, 5] *= outlier  # one outlier channel
    return x, [rng.normal(size=(128, 96)) * 0.05]


def _choose(
    x: np.ndarray, ws: list[np.ndarray], choice: str, transform: str = "hadamard"
) -> tuple[np.ndarray | None, dict[str, float]]:
    config = QuantConfig(smooth=Smooth.NONE, online_rotation=64, rotation_choice=choice, a_bits=8,
                         rotation_transform=transform)  # fmt: skip
    magnitude = np.abs(x).max(axis=0)
    rot, report, _ = choose_online(x, magnitude, ws, (float(x.min()), float(x.max())), W8, A8, config, TARGET)
    return rot, report


def test_outlier_channel_is_rotated_and_error_falls() -> None:
    x, ws = _inputs(outlier=40.0)
    rot, report = _choose(x, ws, "adaptive")
    assert rot is not None
    assert report["outlier_ratio"] >= 3.0
    assert report["error_rotated"] < report["error_plain"]
    np.testing.assert_allclose(rot @ rot.T, np.eye(128), atol=1e-12)  # orthogonal
    assert np.count_nonzero(rot[0]) == 64  # block-diagonal, block 64


def test_flat_input_is_left_alone_unless_all() -> None:
    x, ws = _inputs(outlier=1.0)
    rot, report = _choose(x, ws, "adaptive")
    assert rot is None and report["outlier_ratio"] < 3.0 and "error_rotated" not in report
    rot_all, _ = _choose(x, ws, "all")
    assert rot_all is not None


def test_block_must_divide_channels_and_be_a_power_of_two() -> None:
    x, ws = _inputs(outlier=40.0)
    config = QuantConfig(online_rotation=256)
    rot, report, _ = choose_online(x, np.abs(x).max(0), ws, (-1.0, 1.0), W8, A8, config, TARGET)
    assert rot is None and report["skipped_block"] == 256
    with pytest.raises(QexportError, match="power of two"):
        recipe_of("online_rotation.block=48")
    with pytest.raises(QexportError, match=r"'online_rotation.choice' must be one of 'adaptive', 'all'"):
        recipe_of("online_rotation.choice=some")


def test_duquant_rotation_is_orthogonal_spreads_outliers_and_balances_blocks() -> None:
    rng = np.random.default_rng(3)
    x = rng.normal(size=(3000, 256))
    x[:, [5, 6, 7, 130]] *= [60.0, 45.0, 30.0, 20.0]  # outliers crowded into the first block
    m = compose_duquant(*duquant_factors(x, 64))
    np.testing.assert_allclose(m @ m.T, np.eye(256), atol=1e-12)
    # the permutation between the two block rotations: not block-diagonal
    assert not np.array_equal(m, np.kron(np.eye(4), m[:64, :64]))
    assert np.array_equal(m, compose_duquant(*duquant_factors(x, 64)))  # deterministic (seed 0)
    peak = np.abs(x @ m).max()
    hadamard_peak = np.abs(x @ np.kron(np.eye(4), hadamard(64))).max()
    assert peak < np.abs(x).max() / 4 and peak <= 1.1 * hadamard_peak
    order = _zigzag(np.arange(8.0)[::-1], 2)  # channel 0 largest: dealt 0 1 2 3 3 2 1 0 to 4 blocks
    assert sorted(order) == list(range(8)) and [set(order[i : i + 2]) for i in range(0, 8, 2)] == [
        {0, 7}, {1, 6}, {2, 5}, {3, 4}]  # fmt: skip
    with pytest.raises(QexportError, match="do not split into blocks of 64"):
        duquant_factors(x[:, :96], 64)


def test_the_htp_target_refuses_duquant_before_any_work(tmp_path) -> None:
    """Measured: the HTP backend refuses DuQuant's factored transform when it finalizes the graph."""
    from qexport.exporter.build import BuildConfig, check_request

    duquant = ("online_rotation=on", "online_rotation.transform=duquant")
    with pytest.raises(QexportError, match="target qnn-htp does not run the online rotation transform 'duquant'"):
        check_request(BuildConfig(recipe=recipe_of(*duquant, "target=qnn-htp")), tmp_path / "out")
    assert not (tmp_path / "out").exists()
    check_request(BuildConfig(recipe=recipe_of(*duquant, "target=ort-cpu")), tmp_path / "out")  # the CPU runs it


def test_duquant_is_chosen_where_it_lowers_the_error() -> None:
    x, ws = _inputs(outlier=40.0)
    rot, report = _choose(x, ws, "adaptive", "duquant")
    assert rot is not None and report["error_rotated"] < report["error_plain"]
    np.testing.assert_allclose(rot @ rot.T, np.eye(128), atol=1e-12)
    with pytest.raises(QexportError, match=r"'online_rotation.transform' must be one of 'hadamard', 'duquant'"):
        recipe_of("online_rotation.transform=other")


@pytest.mark.parametrize(("transform", "matmuls"), [("hadamard", 2), ("duquant", 3)])
def test_rotation_pass_is_exact_in_fp(transform: str, matmuls: int) -> None:
    """The graph pass computes x·R (blockwise, DuQuant's from its factors): compare with the dense
    product in onnxruntime."""
    import onnx
    from qexport.passes.analyze import Group
    from qexport.passes.plan import RangePlan
    from qexport.passes.rewrite import PassConfig
    from qexport.passes.techniques.online_rotation import insert_online_rotation

    x = gs.Variable("x", dtype=np.float32, shape=(2, 7, 128))
    w = gs.Constant("w", np.random.default_rng(1).normal(size=(128, 32)).astype(np.float32))
    y = gs.Variable("y", dtype=np.float32, shape=(2, 7, 32))
    graph = gs.Graph(nodes=[gs.Node("MatMul", "mm", inputs=[x, w], outputs=[y])], inputs=[x], outputs=[y], opset=21)
    xs = np.random.default_rng(4).normal(size=(512, 128)) * np.linspace(1, 30, 128)
    factors = duquant_factors(xs, 64)
    rot = np.kron(np.eye(2), hadamard(64)) if transform == "hadamard" else compose_duquant(*factors)
    parts = {"x": factors} if transform == "duquant" else {}
    plan = RangePlan(steps=[0], online={"x": rot}, online_factors=parts)
    group = Group(tensor="x", layers=("fc",), channels=128, fold="explicit")
    graph = insert_online_rotation(graph, PassConfig(plan=plan, groups=[group], nodes={"fc": "mm"}), TARGET)
    graph.cleanup().toposort()
    model = gs.export_onnx(graph)
    model.ir_version = 10
    onnx.checker.check_model(model)
    sess = cpu_session(model.SerializeToString())
    xv = np.random.default_rng(2).normal(size=(2, 7, 128)).astype(np.float32)
    (out,) = sess.run(None, {"x": xv})
    np.testing.assert_allclose(out, (xv @ rot.astype(np.float32)) @ w.values, rtol=1e-4, atol=1e-4)
    assert sum(n.op_type == "MatMul" for n in model.graph.node) == matmuls


@pytest.mark.slow
@pytest.mark.parametrize("transform", ["hadamard", "duquant"])
def test_tiny_latte_online_rotated_build_fuses_verifies_and_replans(latte_stats, tmp_path, transform):
    from qexport.exporter.build import BuildConfig, build, replan
    from qexport.targets.catalog import ORT_CPU
    from qexport.verification.verify import verify

    recipe = recipe_of("smoothquant.mode=asq", "online_rotation.choice=all", "granularity.time_ranges=1",
                       f"online_rotation.transform={transform}")  # fmt: skip
    result = build(latte_stats, tmp_path / "online", BuildConfig(recipe=recipe))
    online = result.manifest["quantization"]["online_rotation"]
    assert online["groups_rotated"] == online["groups_considered"] > 0
    assert online.get("transform", "hadamard") == transform
    assert 0 < online["macs_per_call"] < (0.4 if transform == "duquant" else 0.2) * online["linear_macs_per_call"]
    plan = result.ranges[0].plan
    v = verify(result.folder, result.adapter, [plan], result.manifest, ORT_CPU, "a red circle moving left")
    assert v.ok and all(len(m.integer) == 64 and not m.float_ for m in v.models), v.to_json()
    assert min(m.cosine_sim for m in v.models) >= 0.999
    _, plans, _ = replan(result.manifest, latte_stats)
    assert all(np.array_equal(plans[0].layers[n].w_q, lp.w_q) for n, lp in plan.layers.items())
    assert sorted(plans[0].online) == sorted(plan.online)
