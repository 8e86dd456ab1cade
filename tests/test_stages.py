"""Where a build's time goes: the stage clock's exclusive accounting, and a searched GPTQ build of
tiny-latte timed by stage."""

import time

from qexport.exporter.build import BuildConfig, build

from qexport import stages
from qexport.recipe import recipe_of
from qexport.stages import stage, stage_clock
from qexport.summaries import stage_lines


class _FakeTime:
    def __init__(self) -> None:
        self.now = 0.0

    def perf_counter(self) -> float:
        return self.now


def test_nested_stages_count_for_themselves_only(monkeypatch):
    fake = _FakeTime()
    monkeypatch.setattr(stages, "time", fake)
    with stage("outside any clock"):  # no clock: nothing is counted, nothing fails
        fake.now += 1
    with stage_clock() as clock:
        assert clock.current is None
        with stage("search"):
            fake.now += 2
            with stage("GPTQ"):
                assert clock.current == "GPTQ"  # the innermost open stage (what a memory sampler reads)
                fake.now += 5
                with stage("GPTQ"):  # the same stage nested in itself counts once
                    fake.now += 1
            fake.now += 3
            assert clock.current == "search"
        with stage("GPTQ"):
            fake.now += 4
        assert clock.current is None
    assert clock.seconds == {"search": 5.0, "GPTQ": 10.0}
    assert list(clock.seconds) == ["search", "GPTQ"]  # in the order they first ran
    with stage("after the clock"):
        fake.now += 1
    assert clock.seconds == {"search": 5.0, "GPTQ": 10.0}


def test_a_stage_left_by_an_exception_is_still_counted(monkeypatch):
    fake = _FakeTime()
    monkeypatch.setattr(stages, "time", fake)
    with stage_clock() as clock:
        try:
            with stage("passes"):
                fake.now += 2
                raise ValueError("x")
        except ValueError:
            pass
        with stage("write"):
            fake.now += 1
    assert clock.seconds == {"passes": 2.0, "write": 1.0}


def test_stage_line_lists_the_largest_first_and_the_rest_as_other():
    assert stage_lines({"GPTQ": 65.0, "load": 0.01, "passes": 3.0}, 70.0) == [
        "  time       GPTQ 1m05s · passes 3s · other 2s"
    ]
    assert stage_lines({}, 0.0) == []


def test_a_searched_gptq_build_is_timed_by_stage(latte_stats, tmp_path):
    recipe = recipe_of("granularity.time_ranges=2", "smoothquant.mode=asq", "gptq=on",
                       "activation_observer.method=search", "replay.prompts=1")  # fmt: skip
    start = time.perf_counter()
    with stage_clock() as clock:
        build(latte_stats, tmp_path / "out", BuildConfig(recipe=recipe))
    wall = time.perf_counter() - start
    expected = {"load", "FP export", "FP replay", "observer search", "GPTQ", "plan", "passes", "legality and write"}
    assert expected <= set(clock.seconds), clock.seconds
    assert all(s >= 0 for s in clock.seconds.values())
    # exclusive stages add up to no more than the build, and cover most of it (the rest: reading the
    # statistics, the manifest, the conditioning files)
    assert 0.5 * wall <= sum(clock.seconds.values()) <= wall, (clock.seconds, wall)
