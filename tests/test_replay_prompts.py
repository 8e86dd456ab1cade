"""--replay-prompts: how many calibration prompts the replaying options use, refused where it
cannot apply, recorded in the manifest and replayed again by verify's replan."""

import pytest
from qexport.exporter.build import BuildConfig, build
from qexport.exporter.replan import replan
from qexport.exporter.replay import PROMPTS, replay_count
from qexport.passes.observe import Observer
from qexport.passes.plan import QuantConfig, Smooth

from qexport.errors import QexportError
from qexport.summaries import build_lines


def test_replay_count_defaults_to_at_most_two_and_refuses_more_than_recorded():
    assert PROMPTS == 2
    assert (replay_count(None, 8, "s"), replay_count(None, 1, "s"), replay_count(5, 8, "s")) == (2, 1, 5)
    with pytest.raises(QexportError, match=r"--replay-prompts 3 asks for more prompts than s records \(2\)"):
        replay_count(3, 2, "s")
    with pytest.raises(QexportError, match="--replay-prompts must be at least 1, got 0"):
        QuantConfig(replay_prompts=0)


def test_build_refuses_more_prompts_than_the_statistics_record(latte_stats, tmp_path):
    quant = QuantConfig(act_observer=Observer.SEARCH, replay_prompts=3)
    with pytest.raises(QexportError, match=r"--replay-prompts 3 asks for more prompts than .*latte.qstats records"):
        build(latte_stats, tmp_path / "out", BuildConfig(quant=quant, ranges=1))
    assert not (tmp_path / "out").exists()


def test_build_refuses_replay_prompts_when_nothing_replays(latte_stats, tmp_path):
    with pytest.raises(QexportError, match="none of them is asked for"):
        build(latte_stats, tmp_path / "out", BuildConfig(quant=QuantConfig(replay_prompts=1), ranges=1))
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_one_replayed_prompt_gives_other_ranges_and_replans_exactly(latte_stats, tmp_path):
    def ranges(replays):
        quant = QuantConfig(smooth=Smooth.ASQ, act_observer=Observer.MSE, replay_prompts=replays)
        result = build(latte_stats, tmp_path / f"r{replays}", BuildConfig(quant=quant, ranges=1))
        return result, {n: float(lp.a_scale) for n, lp in result.ranges[0].plan.layers.items()}

    one, scales = ranges(1)
    two, default = ranges(None)
    assert (one.manifest["quantization"]["replay_prompts"], two.manifest["quantization"]["replay_prompts"]) == (1, 2)
    assert sum(scales[n] != default[n] for n in scales) >= len(scales) // 4  # the samples differ
    assert "  replay     1 calibration prompt(s) replayed" in "\n".join(build_lines(one.manifest, 1.0, "r1"))
    _, plans, _ = replan(one.manifest, latte_stats)
    assert {n: float(lp.a_scale) for n, lp in plans[0].layers.items()} == scales
