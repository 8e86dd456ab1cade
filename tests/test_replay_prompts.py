"""--replay-prompts: how many calibration prompts the replaying options use, refused where it
cannot apply, recorded in the manifest and replayed again by verify's replan."""

import pytest
from qexport.exporter.build import BuildConfig, build, replan
from qexport.exporter.replay import PROMPTS, replay_count

from qexport.errors import QexportError
from qexport.recipe import recipe_of
from qexport.summaries import build_lines


def test_replay_count_defaults_to_at_most_two_and_refuses_more_than_recorded():
    assert PROMPTS == 2
    assert (replay_count(None, 8, "s"), replay_count(None, 1, "s"), replay_count(5, 8, "s")) == (2, 1, 5)
    with pytest.raises(QexportError, match=r"'replay.prompts' 3 asks for more prompts than s records \(2\)"):
        replay_count(3, 2, "s")
    with pytest.raises(QexportError, match=r"recipe key 'replay.prompts' must be 1 or more, got 0"):
        recipe_of("gptq=on", "replay.prompts=0")


def test_build_refuses_more_prompts_than_the_statistics_record(latte_stats, tmp_path):
    recipe = recipe_of("activation_observer.method=search", "replay.prompts=3", "granularity.time_ranges=1")
    with pytest.raises(QexportError, match=r"'replay.prompts' 3 asks for more prompts than .*latte.qstats records"):
        build(latte_stats, tmp_path / "out", BuildConfig(recipe=recipe))
    assert not (tmp_path / "out").exists()


def test_a_recipe_refuses_replay_prompts_when_nothing_replays():
    with pytest.raises(QexportError, match="the recipe has neither"):
        recipe_of("replay.prompts=1", "channel_shift=on")
    for target in ("qnn-htp", "qnn-htp-integer"):  # their emission replays prompts (output / all ranges)
        assert recipe_of("replay.prompts=8", "channel_shift=on", f"target={target}").replay.prompts == 8


@pytest.mark.slow
def test_one_replayed_prompt_gives_other_ranges_and_replans_exactly(latte_stats, tmp_path):
    def ranges(replays):
        recipe = recipe_of("smoothquant.mode=asq", "activation_observer.method=mse", "granularity.time_ranges=1",
                           f"replay.prompts={'null' if replays is None else replays}")  # fmt: skip
        result = build(latte_stats, tmp_path / f"r{replays}", BuildConfig(recipe=recipe))
        return result, {n: float(lp.a_scale) for n, lp in result.ranges[0].plan.layers.items()}

    one, scales = ranges(1)
    two, default = ranges(None)
    assert (one.manifest["quantization"]["replay_prompts"], two.manifest["quantization"]["replay_prompts"]) == (1, 2)
    assert sum(scales[n] != default[n] for n in scales) >= len(scales) // 4  # the samples differ
    assert "  replay     1 calibration prompt(s) replayed" in "\n".join(build_lines(one.manifest, 1.0, "r1"))
    _, plans, _ = replan(one.manifest, latte_stats)
    assert {n: float(lp.a_scale) for n, lp in plans[0].layers.items()} == scales


@pytest.mark.parametrize(("model_id", "prompts"), [("tiny-latte", ["a red circle", "a blue square"]),
                                                   ("tiny-dit", ["red circle", "blue square"])])  # fmt: skip
def test_the_replay_keeps_the_loops_own_outputs_which_are_the_denoisers(model_id, prompts):
    """The FP references are recorded while the replay samples (no second pass): each is what the
    denoiser returns on that step's recorded input (tiny-dit learns sigma: the prediction half)."""
    import numpy as np
    from qexport.exporter.replay import CalibrationReplay

    from qexport.models.registry import load_model
    from qexport.models.sampler import timesteps

    adapter = load_model(model_id)
    replay = CalibrationReplay(adapter, prompts, timesteps(adapter, 3), cfg=4.0)
    assert len(replay.references) == len(replay.inputs) == 3
    for k in range(3):
        again = replay.run(k)
        assert again.shape == replay.references[k].shape == (4, *adapter.latent_shape)
        assert np.array_equal(again, replay.references[k]), k


def test_the_replay_keeps_the_gram_matrices_of_one_range_only():
    """A range's searches and its plan share one set of XᵀX; the next range's replaces it (a 20-range
    dit-xl-2 build grew by 5.6 GB a range while every range's were kept); they stay on the replay's
    device as float64 tensors."""
    import torch
    from qexport.exporter.replay import CalibrationReplay

    from qexport.models.registry import load_model
    from qexport.models.sampler import timesteps

    adapter = load_model("tiny-dit")
    layer = next(name for name, m in adapter.transformer.named_modules() if m.__class__.__name__ == "Linear")
    replay = CalibrationReplay(adapter, ["red circle"], timesteps(adapter, 3), cfg=4.0)
    first = replay.input_grams([0], [layer])
    assert first[layer].dtype == torch.float64 and first[layer].device == replay.device
    assert replay.input_grams([0], [layer]) is first  # the same range: kept, not recomputed
    second = replay.input_grams([1], [layer])
    assert len(replay._grams) == 1 and second is not first
    again = replay.input_grams([0], [layer])  # an earlier range again: recomputed, the same sums
    assert again is not first and torch.equal(again[layer], first[layer])


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not __import__("torch").cuda.is_available(), reason="needs a GPU"))])  # fmt: skip
def test_gram_matrices_made_ahead_are_those_made_when_asked_and_the_transformer_waits_for_them(monkeypatch, device):
    """A GPU build starts the next range's XᵀX on a thread of its own while the CPU writes a model:
    the same sums as made when asked, taken by the next input_grams, and whatever next uses the
    transformer (run, adapter, denoiser) waits for them; their error reaches that caller."""
    import threading

    import numpy as np
    import torch
    from qexport.exporter.replay import CalibrationReplay

    from qexport.models.registry import load_model
    from qexport.models.sampler import timesteps

    adapter = load_model("tiny-dit")
    layers = [name for name, m in adapter.transformer.named_modules() if m.__class__.__name__ == "Linear"][:3]
    replay = CalibrationReplay(adapter, ["red circle"], timesteps(adapter, 3), 4.0, device)  # a GPU's: their own stream
    asked = {k: v.clone() for k, v in replay.input_grams([1, 2], layers).items()}
    replay.input_grams([0], layers)
    release, started, threads = threading.Event(), threading.Event(), []
    made = replay._gram_set

    def held(steps, names):  # the job waits until the main thread has asked for the transformer
        threads.append(threading.get_ident())
        started.set()
        assert release.wait(timeout=30)
        return made(steps, names)

    monkeypatch.setattr(replay, "_gram_set", held)
    replay.grams_ahead([1, 2], layers)
    assert started.wait(timeout=30) and replay._ahead is not None and not replay._grams  # the last set let go
    threading.Timer(0.2, release.set).start()
    out = replay.run(0)  # waits for the job (released 0.2 s later), then runs
    assert replay._ahead is None and np.array_equal(out, replay.references[0])
    ahead = replay.input_grams([1, 2], layers)  # taken as made, not made again
    assert threads and threads[0] != threading.get_ident() and len(threads) == 1
    assert set(ahead) == set(asked) and all(torch.equal(ahead[n], asked[n]) for n in layers)

    def broken(steps, names):
        raise RuntimeError("out of device memory")

    monkeypatch.setattr(replay, "_gram_set", broken)
    replay.grams_ahead([0, 1], layers)
    with pytest.raises(RuntimeError, match="out of device memory"):
        replay.adapter  # noqa: B018 (the property waits for the job)
    assert replay._ahead is None


@pytest.mark.parametrize(
    "device",
    ["cpu", pytest.param("cuda", marks=pytest.mark.skipif("not __import__('torch').cuda.is_available()"))],
)
def test_tf32_scoring_changes_only_the_scored_passes_and_only_on_a_gpu(device):
    """replay.scoring=tf32: a candidate's scoring pass may run its matmuls in TF32 on a GPU, but the FP
    references and run() (what observers and GPTQ read) stay exact; on the CPU nothing changes."""
    import numpy as np
    from qexport.exporter.replay import CalibrationReplay

    from qexport.metrics import sqnr_db
    from qexport.models.registry import load_model
    from qexport.models.sampler import timesteps
    from qexport.recipe import Scoring

    adapter = load_model("tiny-dit")
    replay = CalibrationReplay(adapter, ["red circle"], timesteps(adapter, 2), 4.0, device, Scoring.TF32)
    for k in range(2):
        exact, scored = replay.run(k), replay.scored(k)
        if device == "cpu":
            assert np.array_equal(exact, replay.references[k])
            assert np.array_equal(scored, exact)
        else:  # TF32 rounds the matmul inputs to 10 mantissa bits: near the exact output, not equal
            assert 30.0 < sqnr_db(exact, scored) < float("inf")


def test_the_replays_device_copy_makes_each_tensor_there_and_keeps_ties():
    """on_device's copy: parameters and buffers made on the device one at a time (meta here), the
    host model untouched, a parameter shared by two modules still shared."""
    import torch
    from qexport.exporter.replay import device_copy
    from torch import nn

    model = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4), nn.Linear(4, 4))
    model[2].weight = model[0].weight  # tied
    clone = device_copy(model, torch.device("meta"))
    assert all(p.device.type == "meta" for p in clone.parameters())
    assert all(b.device.type == "meta" for b in clone.buffers())
    assert clone[2].weight is clone[0].weight and clone[0].weight is not model[0].weight
    assert all(p.device.type == "cpu" for p in model.parameters())
    assert isinstance(clone[0].weight, nn.Parameter) and clone[0].weight.requires_grad


@pytest.mark.parametrize(
    "settings",
    [
        ("smoothquant.mode=asq", "activation_observer.method=mse"),  # per step: the step graphs' copies
        pytest.param(
            (
                "smoothquant.mode=tsq",
                "smoothquant.alpha=auto",
                "gptq=on",
                "replay.prompts=2",
                "granularity.time_ranges=1",
            ),
            marks=pytest.mark.slow,
        ),
    ],
    ids=["asq-mse-per-step", "tsq-alpha-gptq"],
)
def test_a_replay_run_beside_the_fp_export_builds_the_same_files(latte_stats, tmp_path, monkeypatch, settings):
    """On a GPU the replay samples in a thread of its own, on its own transformer, while the FP
    export traces the host's, and the host's copies of the quantized linears' FP weights are
    released while the ranges are planned (read from the replay's transformer instead, then made
    again): the same layout on the CPU (the transformer copied as a GPU build's is) gives the files
    the sequential build gives, byte for byte, never loads a released weight into the graph, and
    leaves the host transformer as it was."""
    import gc
    import hashlib
    import weakref

    import qexport.exporter.build as build_module
    import torch
    from qexport.exporter.replay import device_copy
    from qexport.passes.fp_weights import OnDevice

    recipe = recipe_of(*settings)

    def digests(out):
        result = build(latte_stats, out, BuildConfig(recipe=recipe, force=True))
        files = sorted(p for p in out.iterdir() if p.suffix in (".onnx", ".bin"))
        return result, {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in files}

    _, sequential = digests(tmp_path / "seq")
    threads = []

    def copied(adapter, device):
        from dataclasses import replace

        return replace(adapter, transformer=device_copy(adapter.transformer, torch.device("cpu")).eval())

    real = build_module.CalibrationReplay

    def replay_in_thread(*args, **kwargs):
        import threading

        threads.append(threading.current_thread().name)
        return real(*args, **kwargs)

    released = []

    def release(constants, names, host, device):
        views = [weakref.ref(constants[name]._values) for name in names.values()]
        emptied = real_release(constants, names, host, device)
        released.append(len(emptied))
        gc.collect()
        assert all(p.numel() == 0 for p in emptied.values())  # the host copies are gone while planning:
        assert not any(view() is not None for view in views)  # nothing else holds their memory
        return emptied

    def loaded(self):
        raise AssertionError(f"a released FP weight was loaded into the graph: {self}")

    real_release = build_module.release
    monkeypatch.setattr(build_module, "overlapped", lambda device: True)
    monkeypatch.setattr(build_module, "on_device", copied)
    monkeypatch.setattr(build_module, "CalibrationReplay", replay_in_thread)
    monkeypatch.setattr(build_module, "release", release)
    monkeypatch.setattr(OnDevice, "load", loaded)
    result, overlapping = digests(tmp_path / "both")
    assert threads and all(name.startswith("replay") for name in threads)  # it ran beside the export
    assert released and released[0] == len(result.stats.layers)  # every quantized linear's
    assert len(sequential) > 2 and overlapping == sequential
    first = build_module.load_model("tiny-latte").transformer.state_dict()
    after = result.adapter.transformer.state_dict()
    assert after.keys() == first.keys() and all(torch.equal(after[k], first[k]) for k in first)
