"""--alpha layer: the per-group choice (least output error; ASQ: averaged over all ranges, so one
choice for every step) and its reproduction from the manifest."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
from qexport.exporter import alpha as alpha_mod
from qexport.exporter.build import BuildConfig, build
from qexport.exporter.search import ALPHAS
from qexport.passes.analyze import Group

from qexport.recipe import recipe_of

GROUPS = [Group(tensor=t, layers=(f"{t}.linear",), channels=4, fold="explicit") for t in ("a", "b")]
# error of group g at alpha a in range r: least at 0.3 / 0.8 in range 0 and at 0.5 / 0.8 in range 1
BEST = {(0, "a"): 0.3, (0, "b"): 0.8, (1, "a"): 0.5, (1, "b"): 0.8}


class Replay:
    def layer_inputs(self, steps, names):
        return {name: np.zeros((10, 4), np.float32) for name in names}


def _choose(monkeypatch, shared):
    def make_plan(steps, alpha, samples):
        return SimpleNamespace(range=steps[0], alpha=alpha)

    def error(plan, group, x):
        return (plan.alpha - BEST[(plan.range, group.tensor)]) ** 2 + (0.05 if plan.range else 0.0)

    monkeypatch.setattr(alpha_mod, "group_error", error)
    return alpha_mod.layer_alphas(Replay(), [[0], [1]], GROUPS, make_plan, shared=shared)


def test_layer_alphas_picks_the_least_error_per_group_and_range(monkeypatch):
    assert _choose(monkeypatch, shared=False) == [{"a": 0.3, "b": 0.8}, {"a": 0.5, "b": 0.8}]


def test_layer_alphas_shared_averages_the_ranges_and_picks_one_choice_for_all(monkeypatch):
    # group a: the mean of (a-0.3)² and (a-0.5)² is least at 0.4, which neither range picks alone
    assert _choose(monkeypatch, shared=True) == [{"a": 0.4, "b": 0.8}, {"a": 0.4, "b": 0.8}]


@pytest.mark.slow
def test_alpha_layer_asq_build_shares_one_choice_and_replans(latte_stats, tmp_path):
    from qexport.exporter.build import replan

    recipe = recipe_of("smoothquant.mode=asq", "smoothquant.alpha=layer", "granularity.time_ranges=2")
    result = build(latte_stats, tmp_path / "layer", BuildConfig(recipe=recipe))
    manifest = result.manifest
    assert manifest["quantization"]["alpha"] == "layer"
    chosen = [r["group_alpha"] for r in manifest["ranges"]]
    assert chosen[0] == chosen[1] and chosen[0], chosen  # ASQ: one choice for all ranges
    assert all(a in ALPHAS for a in chosen[0].values())
    first = result.ranges[0].plan
    assert all(np.array_equal(lp.w_q, result.ranges[1].plan.layers[name].w_q) for name, lp in first.layers.items())
    _, plans, _ = replan(manifest, latte_stats)
    for old, new in zip(result.ranges, plans, strict=True):
        assert new.group_alpha == old.plan.group_alpha
        assert all(np.array_equal(new.layers[n].w_q, lp.w_q) for n, lp in old.plan.layers.items())
