import numpy as np

from qexport.models import judge, shapes


def test_judge_on_200_ground_truth_clips():
    clips, specs = shapes.make_dataset(200, seed=2026)
    report = judge.score(clips, [s.caption for s in specs])
    for key in ("colour", "shape", "direction"):
        assert report.accuracy[key] >= 0.98, (key, report.accuracy)
    assert 0.5 < report.temporal_consistency < 1.0


def test_judge_on_ground_truth_images():
    images, specs = shapes.make_dataset(100, seed=5, moving=False)
    report = judge.score(images[:, 0], [shapes.label_of(s.colour, s.shape) for s in specs])
    assert report.accuracy["colour"] >= 0.98 and report.accuracy["shape"] >= 0.98
    assert "direction" not in report.accuracy and report.temporal_consistency is None


def test_judge_rejects_wrong_captions():
    clips, specs = shapes.make_dataset(60, seed=11)
    wrong = [shapes.caption_of(*shapes.all_combinations()[(i * 7 + 5) % 72]) for i in range(60)]
    truth = judge.score(clips, [s.caption for s in specs])
    shuffled = judge.score(clips, wrong)
    assert shuffled.adherence < truth.adherence - 0.4


def test_blank_clip_detects_nothing():
    blank = np.full((4, 32, 32, 3), 90, np.uint8)
    d = judge.detect(blank)
    assert d.shape is None and d.direction is None


def test_temporal_consistency_orders_static_and_random():
    rng = np.random.default_rng(0)
    static = np.repeat(rng.integers(0, 255, (1, 32, 32, 3), dtype=np.uint8), 8, axis=0)
    noise = rng.integers(0, 255, (8, 32, 32, 3), dtype=np.uint8)
    assert judge.temporal_consistency(static) > 0.999
    assert abs(judge.temporal_consistency(noise)) < 0.1
