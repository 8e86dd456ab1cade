"""--mixed-precision: the allocation keeps the budget and raises the most sensitive layers per byte;
refusals before any work; on tiny-latte the emitted W4/W8 models verify (int8 layers on integer
kernels, int4 ones emulated) and the replan reproduces every layer's width."""

import json

import pytest
from qexport.exporter import mixed
from qexport.exporter.build import BuildConfig, build, check_request, replan
from qexport.exporter.mixed import allocate, spread, storage_bits, weight_bytes
from qexport.targets.catalog import ORT_CPU, get_profile
from qexport.verification.verify import verify

from qexport.errors import QexportError
from qexport.recipe import recipe_of

PARAMS = {"a": 1000, "b": 4000, "c": 1000, "d": 2000}


def _bits_per_weight(bits):
    return weight_bytes(PARAMS, bits, ORT_CPU) * 8 / sum(PARAMS.values())


def test_allocation_keeps_the_budget_and_raises_the_most_sensitive_per_byte():
    sens = {"a": 5.0, "b": 8.0, "c": 0.1, "d": 3.0}  # per parameter: a 5e-3, d 1.5e-3, b 2e-3, c 1e-4
    for budget in (4.0, 4.4, 5.0, 5.5, 6.0, 7.0, 8.0):
        bits = allocate(sens, PARAMS, 4, budget, ORT_CPU)
        assert _bits_per_weight(bits) <= budget + 1e-9, (budget, bits)
    assert set(allocate(sens, PARAMS, 4, 4.0, ORT_CPU).values()) == {4}
    assert set(allocate(sens, PARAMS, 4, 8.0, ORT_CPU).values()) == {8}
    # 5 bits/weight: 2000 extra bytes of 4 bits each fit; a (1000) first, then b (4000) no longer fits,
    # d (2000) does not either (1000 + 2000 > 2000), then c
    assert allocate(sens, PARAMS, 4, 5.0, ORT_CPU) == {"a": 8, "b": 4, "c": 8, "d": 4}
    assert allocate(sens, PARAMS, 4, 6.5, ORT_CPU) == {"a": 8, "b": 8, "c": 4, "d": 4}  # then d, c do not fit
    assert allocate(sens, PARAMS, 3, 8.0, ORT_CPU) == dict.fromkeys(PARAMS, 8)  # W3 lives in int4
    assert storage_bits(3, ORT_CPU) == 4 and storage_bits(8, ORT_CPU) == 8
    assert weight_bytes({"x": 3}, {"x": 4}, ORT_CPU) == 2  # packed two per byte, rounded up


def test_spread_picks_evenly_with_both_ends():
    assert spread(list(range(20)), 4) == [0, 6, 13, 19]
    assert spread([3, 4], 4) == [3, 4]
    assert spread([5, 6, 7], 1) == [5]


def test_bad_requests_are_refused_before_any_work(tmp_path):
    with pytest.raises(QexportError, match=r"needs bits.weights 2\.\.4"):
        recipe_of("mixed_precision.budget=6")
    with pytest.raises(QexportError, match=r"budget of 4\.\.8"):
        recipe_of("bits.weights=4", "mixed_precision.budget=9")
    mixed_w4 = recipe_of("bits.weights=4", "mixed_precision.budget=6")
    with pytest.raises(QexportError, match="cannot store 4-bit weights"):
        check_request(BuildConfig(recipe=recipe_of("target=ryzen-ai", base=mixed_w4)), tmp_path / "o")
    with pytest.raises(QexportError, match="'mixed_precision' does not combine with 'precompute_kv'"):
        recipe_of("precompute_kv=on", base=mixed_w4)
    assert get_profile("qnn-htp").weight_type(4) == "int4"


@pytest.mark.slow
def test_w4_w8_build_verifies_and_replans_the_same_widths(latte_stats, tmp_path, monkeypatch):
    monkeypatch.setattr(mixed, "STEPS", 1)  # one replayed step: 65 simulated denoiser calls
    recipe = recipe_of(
        "bits.weights=4", "smoothquant.mode=asq", "mixed_precision.budget=6", "granularity.time_ranges=1"
    )
    result = build(latte_stats, tmp_path / "mixed", BuildConfig(recipe=recipe))
    plan, alloc = result.ranges[0].plan, result.ranges[0].mixed
    assert alloc is not None and len(alloc.sensitivity) == 64 and alloc.steps == [0]
    widths = {layer: lp.w_grid.bits for layer, lp in plan.layers.items()}
    assert widths == alloc.bits
    params = {layer: int(lp.w_q.size) for layer, lp in plan.layers.items()}
    assert widths == allocate(alloc.sensitivity, params, 4, 6.0, ORT_CPU)
    high = [k for k, b in widths.items() if b == 8]
    assert 0 < len(high) < 64 and weight_bytes(params, widths, ORT_CPU) * 8 <= 6.0 * sum(params.values())
    density = {k: alloc.sensitivity[k] / params[k] for k in params}
    top = max(density, key=density.__getitem__)
    assert widths[top] == 8, "the most sensitive layer per byte is raised first"

    manifest = json.loads((result.folder / "manifest.json").read_text())
    summary = manifest["quantization"]["mixed_precision"]
    assert sorted(manifest["ranges"][0]["w_bits_raised"]) == sorted(high)
    assert summary["ranges"][0]["layers_at"] == {"4": 64 - len(high), "8": len(high)}
    assert summary["all_low_bytes"] < summary["ranges"][0]["weight_bytes"] <= summary["all_high_bytes"]

    v = verify(result.folder, result.adapter, [plan], result.manifest, ORT_CPU, "a red circle moving left")
    assert v.ok and v.native, v.to_json()
    check = v.models[0]
    assert sorted(check.integer) == sorted(high) and len(check.emulated) == 64 - len(high), v.to_json()

    _, plans, _ = replan(manifest, None)
    again = {layer: (lp.w_grid.bits, lp.w_grid.storage) for layer, lp in plans[0].layers.items()}
    assert again == {layer: (lp.w_grid.bits, lp.w_grid.storage) for layer, lp in plan.layers.items()}
    assert all((plans[0].layers[k].w_q == plan.layers[k].w_q).all() for k in plan.layers)
