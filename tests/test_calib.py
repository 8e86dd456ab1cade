"""Calibration on the smoke-trained built-in architectures: coverage, exact shard merging,
2-process gloo reduction, bounded memory, and clear errors for bad files."""

import os
import random
import subprocess
import sys

import numpy as np
import pytest
import torch
from qexport.calib.run import CalibConfig, calibrate
from qexport.calib.selection import LayerSelection
from qexport.calib.stats import HIST_BINS
from qexport.calib.store import QStats, check_matches, load, merge_all, save
from qstats_mutations import edit

from qexport.errors import QexportError
from qexport.models.registry import load_model
from qexport.models.sampler import SamplingConfig

PROMPTS = ("a red circle moving left", "a blue square moving up", "a green triangle moving right")
SAMPLING = SamplingConfig(steps=4, cfg=7.0)


@pytest.fixture(scope="module")
def latte(smoke_models):
    return load_model(f"diffusers:{smoke_models / 'tiny-latte'}")


def _config(**kw):
    base = dict(prompts=PROMPTS, seeds=(0, 1), sampling=SAMPLING, batch_size=2, histograms=True)
    return CalibConfig(**{**base, **kw})


@pytest.fixture(scope="module")
def single(latte, tmp_path_factory):
    path = tmp_path_factory.mktemp("calib") / "all.qstats"
    save(calibrate(latte, _config()).stats, path)
    return path


def test_every_block_linear_and_step_is_covered(latte, single):
    stats = load(single)
    linears = [n for n, m in latte.transformer.named_modules() if type(m).__name__ == "Linear"]
    blocks = [n for n in linears if "transformer_blocks" in n and "norm" not in n and "emb" not in n]
    assert sorted(stats.layers) == sorted(blocks)
    assert "proj_out" in stats.header["excluded"] and "adaln_single.linear" in stats.header["excluded"]
    assert stats.header["timesteps"] == [999, 749, 499, 249] and stats.steps == 4
    for s in stats.layers.values():
        assert (s.count == 12).all()  # 3 prompts x 2 seeds x (cond + uncond)
        assert (s.minimum <= s.maximum).all() and np.isfinite(s.absmax_mean).all()
        np.testing.assert_array_equal(s.channel_min.min(1), s.minimum)
        np.testing.assert_array_equal(s.channel_max.max(1), s.maximum)
        assert (np.maximum(-s.channel_min, s.channel_max) >= s.absmax_mean - 1e-6).all()
        assert s.asq_n == 3 * 4 and (s.asq > 0).all()  # 3 batches x 4 steps
        assert s.hist is not None and (s.hist.sum(1) > 0).all()
        assert (s.absmax_mean.max(1) <= np.maximum(-s.minimum, s.maximum) + 1e-6).all()


def _assert_equal(a, b):
    assert a.header["layers"] == b.header["layers"]
    for name in a.layers:
        x, y = a.layers[name], b.layers[name]
        np.testing.assert_array_equal(x.minimum, y.minimum)
        np.testing.assert_array_equal(x.maximum, y.maximum)
        np.testing.assert_array_equal(x.channel_min, y.channel_min)
        np.testing.assert_array_equal(x.channel_max, y.channel_max)
        np.testing.assert_array_equal(x.count, y.count)
        np.testing.assert_allclose(x.absmax_mean, y.absmax_mean, rtol=1e-5)
        np.testing.assert_allclose(x.asq, y.asq, rtol=1e-5)
        assert x.asq_n == y.asq_n
        np.testing.assert_array_equal(x.hist_range, y.hist_range)
        np.testing.assert_array_equal(x.hist, y.hist)


def test_shards_merge_to_the_single_process_result(latte, single, tmp_path):
    parts = []
    for i in range(2):
        path = tmp_path / f"s{i}.qstats"
        save(calibrate(latte, _config(shard=(i, 2))).stats, path)
        parts.append(load(path))
    merged = merge_all(parts[::-1])  # order given does not matter: shards sort themselves
    assert merged.header["shard"] is None and merged.header["samples"] == 6
    _assert_equal(load(single), merged)
    with pytest.raises(QexportError, match="given twice"):
        merge_all([parts[0], parts[0]])


def test_two_process_gloo_calibration_equals_single_process(smoke_models, single, tmp_path):
    out = tmp_path / "dist.qstats"
    prompts = tmp_path / "p.txt"
    prompts.write_text("\n".join(PROMPTS))
    # each rank with this process's thread count: the comparison is exact, so only the process split may differ
    env = {**os.environ, "QEXPORT_BACKEND": "gloo", "OMP_NUM_THREADS": str(torch.get_num_threads())}
    model = f"diffusers:{smoke_models / 'tiny-latte'}"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", "29531",
           "-m", "qexport", "calibrate", "--model", model, "--prompts", str(prompts),
           "--steps", "4", "--seeds", "0,1", "--batch-size", "2", "--histograms", "-o", str(out)]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    _assert_equal(load(single), load(out))


def test_memory_does_not_grow_with_calibration_data(latte):
    from qexport.calib.collect import Collector
    from qexport.calib.selection import select_layers

    from qexport.models.sampler import sample

    layers = select_layers(latte.transformer, LayerSelection()).layers
    sizes = []
    for n_batches in (1, 3):
        collector = Collector(layers, SAMPLING.steps, False, latte.transformer.device)
        collector.samples = 2
        for _ in range(n_batches):
            sample(
                latte,
                latte.conditioner.encode(PROMPTS[:1]),
                [0],
                SAMPLING,
                on_step=lambda i, t, c=collector: setattr(c, "step", i),
            )
        held = collector.nbytes()
        sizes.append(held)
        collector.close()
    assert sizes[0] == sizes[1]


def test_bad_files_are_clear_errors(single, tmp_path):
    data = single.read_bytes()
    truncated = tmp_path / "t.qstats"
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(QexportError, match="truncated or corrupted"):
        load(truncated)
    garbage = tmp_path / "g.qstats"
    garbage.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all!")
    with pytest.raises(QexportError, match=r"not a \.qstats file"):
        load(garbage)
    with pytest.raises(QexportError, match="does not exist"):
        load(tmp_path / "missing.qstats")
    stats = load(single)
    newer = tmp_path / "v99.qstats"  # a later qexport's file: its digests hold, its version is unknown here
    newer.write_bytes(edit(single.read_bytes(), random.Random(0), True, header=lambda h, _: h.update(version=99)))
    with pytest.raises(QexportError, match=r"has \.qstats version 99 .*this qexport reads version 2"):
        load(newer)
    with pytest.raises(QexportError, match="field 'version'"):  # save writes only its own version
        save(QStats(header={**stats.header, "version": 99}, layers=stats.layers), newer)


def test_stats_from_another_model_are_refused(single, smoke_models):
    stats = load(single)
    dit = load_model(f"diffusers:{smoke_models / 'tiny-dit'}")
    with pytest.raises(
        QexportError, match=r"calibrated on model 'diffusers:.*tiny-latte'.*not on 'diffusers:.*tiny-dit'"
    ):
        check_matches(stats, dit.model_id, dit.config_hash())


def test_bad_prompts_and_patterns_fail_before_sampling(latte):
    with pytest.raises(QexportError, match="unknown word 'purple'"):
        calibrate(latte, _config(prompts=("a purple circle moving left",)))
    with pytest.raises(QexportError, match="matches no linear layer"):
        calibrate(latte, _config(selection=LayerSelection(exclude=("*nothing_like_this*",))))
    with pytest.raises(QexportError, match="shard"):
        _config(shard=(2, 2))


def test_histogram_bins_are_the_documented_count(single):
    s = next(iter(load(single).layers.values()))
    assert s.hist.shape == (4, HIST_BINS)
    assert all(np.log2(r) == round(np.log2(r)) for r in s.hist_range)


def test_autocast_dtype_is_recorded_and_close_to_fp32(latte):
    sampling = SamplingConfig(steps=2, cfg=7.0)
    base = dict(prompts=PROMPTS[:1], sampling=sampling, batch_size=1)
    fp32 = calibrate(latte, CalibConfig(**base, dtype="fp32")).stats
    bf16 = calibrate(latte, CalibConfig(**base, dtype="bf16")).stats
    assert fp32.header["autocast"] == "float32" and bf16.header["autocast"] == "bfloat16"
    for name, ref in fp32.layers.items():
        got = bf16.layers[name]
        assert np.all(np.isfinite(got.channel_max)) and np.array_equal(got.count, ref.count)
        scale = np.abs(ref.channel_max).max()
        assert np.abs(got.channel_max - ref.channel_max).max() <= 0.1 * scale + 1e-3, name


def test_unknown_autocast_dtype_is_refused():
    with pytest.raises(QexportError, match="--dtype must be one of"):
        CalibConfig(prompts=PROMPTS, dtype="fp8")


def test_layers_reading_one_tensor_share_its_reduction_and_get_the_same_statistics(monkeypatch):
    """q, k and v of one input are reduced once; their statistics equal those of three separate
    copies of the input, and an input changed in place between two reads is reduced again."""
    from qexport.calib.collect import Collector

    torch.manual_seed(0)
    qkv = {n: torch.nn.Linear(16, 8) for n in ("q", "k", "v")}
    reductions = []
    amin = torch.Tensor.amin

    def counted(self: torch.Tensor, *a: object, **k: object) -> torch.Tensor:
        reductions.extend([1] if self.shape[1:] == (5, 16) else [])  # over an activation [samples, 5 tokens, C]
        return amin(self, *a, **k)

    monkeypatch.setattr(torch.Tensor, "amin", counted)

    def collect(shared: bool, in_place: bool) -> dict:
        collector = Collector(qkv, steps=2, histograms=False, device=torch.device("cpu"))
        for step in range(2):
            collector.samples, collector.step = 3, step
            x = torch.randn(3, 5, 16, generator=torch.Generator().manual_seed(step))
            for name, layer in qkv.items():
                layer(x if shared else x.clone())
                if in_place and name == "q":
                    x.mul_(2.0)
        return collector.close()

    reductions.clear()
    shared = collect(shared=True, in_place=False)
    assert len(reductions) == 2  # one a step
    reductions.clear()
    apart = collect(shared=False, in_place=False)
    assert len(reductions) == 6
    for name in qkv:
        for field in ("channel_min", "channel_max", "absmax_sum", "asq_z"):
            assert np.array_equal(getattr(shared[name], field), getattr(apart[name], field)), (name, field)
    reductions.clear()
    changed = collect(shared=True, in_place=True)
    assert len(reductions) == 4  # q, then k and v after the in-place change
    assert np.array_equal(changed["k"].channel_max, 2 * changed["q"].channel_max)
