import numpy as np

from qexport.models import shapes


def test_render_is_deterministic_and_in_range():
    spec = shapes.ClipSpec(colour="red", shape="circle", direction="left", seed=7)
    a, b = shapes.render(spec), shapes.render(spec)
    assert a.shape == (shapes.FRAMES, shapes.SIZE, shapes.SIZE, 3) and a.dtype == np.uint8
    assert np.array_equal(a, b)
    other = shapes.render(shapes.ClipSpec(colour="red", shape="circle", direction="left", seed=8))
    assert not np.array_equal(a, other)


def test_shape_moves_in_its_direction():
    for direction, (dx, dy) in shapes.DIRECTIONS.items():
        clip = shapes.render(shapes.ClipSpec(colour="yellow", shape="square", direction=direction, seed=3))
        centres = []
        for frame in clip:
            rows, cols = np.nonzero(np.abs(frame[..., 2].astype(int) - 40) < 25)  # yellow has little blue
            centres.append((cols.mean(), rows.mean()))
        (x0, y0), (x1, y1) = centres[0], centres[-1]
        assert np.sign(round(x1 - x0)) == dx and np.sign(round(y1 - y0)) == dy, direction


def test_captions_and_coverage():
    assert (
        shapes.ClipSpec(colour="blue", shape="triangle", direction="up", seed=0).caption == "a blue triangle moving up"
    )
    assert len(shapes.COLOURS) >= 6 and set(shapes.SHAPES) == {"circle", "square", "triangle"}
    assert len(shapes.all_combinations()) == len(shapes.COLOURS) * 3 * 4
    prompts = shapes.eval_prompts()
    assert len(prompts) >= 24
    words = {w for p in prompts for w in p.split()}
    assert set(shapes.COLOURS) <= words and set(shapes.SHAPES) <= words and set(shapes.DIRECTIONS) <= words


def test_dataset_is_deterministic():
    a, specs_a = shapes.make_dataset(5, seed=1)
    b, specs_b = shapes.make_dataset(5, seed=1)
    assert np.array_equal(a, b) and specs_a == specs_b
    still, _ = shapes.make_dataset(2, seed=1, moving=False)
    assert np.array_equal(still[:, 0], still[:, -1])
