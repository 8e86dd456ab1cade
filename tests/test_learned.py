"""Learned static activation quantizers (technique ``learned``, exporter.learn): a tiny-latte build
trains its blocks' input quantizers for a few steps, each block's output error against FP falls,
the values land in the plan and the manifest as plain per-tensor scales and zero points, a
re-plan sets them without training, and the emitted QDQ model matches the simulation."""

import numpy as np
import pytest
from qexport.exporter.build import BuildConfig, build, replan
from qexport.passes.quant import STORAGE
from qexport.targets.catalog import ORT_CPU
from qexport.verification.verify import verify

from qexport.errors import QexportError
from qexport.recipe import recipe_of

SETTINGS = ("learned=on", "learned.iterations=6", "learned.rows=4", "bits.activations=6",
            "granularity.time_ranges=1")  # fmt: skip


@pytest.fixture(scope="module")
def learned_build(latte_stats, tmp_path_factory):
    return build(latte_stats, tmp_path_factory.mktemp("learned") / "b", BuildConfig(recipe=recipe_of(*SETTINGS)))


def test_training_lowers_every_blocks_output_error_and_sets_plain_scales(learned_build, latte_stats):
    plan = learned_build.ranges[0].plan
    errors = plan.parts["learned_mse"]
    assert len(errors) == 8  # tiny-latte: 4 spatial and 4 temporal blocks
    assert all(after < before for before, after in errors.values()), errors
    learned = plan.parts["learned"]
    assert set(learned) == set(plan.layers)  # every planned linear of tiny-latte is inside a block
    untrained = build(latte_stats, learned_build.folder.parent / "plain",
                      BuildConfig(recipe=recipe_of(*SETTINGS[3:]))).ranges[0].plan  # fmt: skip
    moved = 0
    for layer, (scale, zero) in learned.items():
        lp = plan.layers[layer]
        assert lp.a_scale.dtype == np.float32 and lp.a_scale.shape == () and float(lp.a_scale) == np.float32(scale)
        assert lp.a_zero.dtype == STORAGE[lp.a_grid.storage][0] and int(lp.a_zero) == zero
        assert lp.a_grid.qmin <= zero <= lp.a_grid.qmax
        moved += float(lp.a_scale) != float(untrained.layers[layer].a_scale)
    assert moved >= len(learned) // 2  # training moved most step sizes off the min-max ones
    record = learned_build.manifest["quantization"]["learned"]
    assert record["linears"] == len(learned) and record["iterations"] == 6
    (before, after), = record["block_mse"]  # fmt: skip
    assert after < before


def test_a_replan_sets_the_learned_values_without_training(learned_build, latte_stats):
    _, plans, _ = replan(learned_build.manifest, latte_stats, folder=learned_build.folder)
    built = learned_build.ranges[0].plan
    assert "learned_mse" not in plans[0].parts  # nothing trained
    for layer, lp in built.layers.items():
        assert float(plans[0].layers[layer].a_scale) == float(lp.a_scale)
        assert int(plans[0].layers[layer].a_zero) == int(lp.a_zero)


def test_later_ranges_start_from_what_the_range_before_learned(latte_stats, tmp_path):
    """warm_iterations 0: each range after the first keeps the first range's learned moves (ratio of
    step sizes, offset of zero points) on its own planned quantizers, untrained; the record says so."""
    import math

    settings = (*SETTINGS[:-1], "granularity.time_ranges=2", "learned.warm_iterations=0")
    built = build(latte_stats, tmp_path / "warm", BuildConfig(recipe=recipe_of(*settings)))
    first, second = (r.plan for r in built.ranges)
    assert "learned_from" in first.parts and "learned_mse" in second.parts
    moved = 0
    for layer, (scale, zero) in second.parts["learned"].items():
        learned0, planned0 = first.parts["learned"][layer], first.parts["learned_from"][layer]
        planned1 = second.parts["learned_from"][layer]
        want = math.exp(math.log(planned1[0]) + math.log(learned0[0] / planned0[0]))
        assert math.isclose(scale, want, rel_tol=1e-9), (layer, scale, want)
        lp = second.layers[layer]
        grid_zero = min(max(round(planned1[1] + learned0[1] - planned0[1]), lp.a_grid.qmin), lp.a_grid.qmax)
        assert zero == grid_zero
        moved += scale != planned1[0]
    assert moved >= len(second.parts["learned"]) // 2
    assert built.manifest["quantization"]["learned"]["warm_iterations"] == 0


@pytest.mark.parametrize(("settings", "message"), [
    (["learned.iterations=0"], "iterations >= 1"),
    (["learned=on", "learned.warm_iterations=-1"], "warm_iterations must be >= 0"),
    (["learned=on", "dynamic_activations=on"], "does not combine"),
])  # fmt: skip
def test_bad_learning_settings_are_refused(settings, message):
    with pytest.raises(QexportError, match=message):
        recipe_of(*settings)


@pytest.mark.slow  # a verification on onnxruntime
def test_the_emitted_qdq_model_matches_the_simulation(learned_build):
    plan = learned_build.ranges[0].plan
    v = verify(learned_build.folder, learned_build.adapter, [plan], learned_build.manifest, ORT_CPU,
               "a red circle moving left")  # fmt: skip
    assert v.ok, v.to_json()  # within the LSB bound verify derives from the simulation's own sensitivity
    check = v.models[0]
    assert check.max_lsb_sim <= check.lsb_bound and check.lsb_judged
    # 6-bit activations: one flipped rounding moves an output by a 6-bit step, so the cosine is lower
    # than at 8 bits (measured 0.99979 here, 0.99991 for the same build untrained); verify's floor
    assert check.cosine_sim >= 0.999
