"""Low-rank error compensation (--lowrank): the numpy factors reduce the output error on
calibration-like inputs; on a tiny two-linear graph the branch reads the dequantized activation,
the quantized MatMul still fuses to an integer kernel, and onnxruntime equals the simulation."""

import itertools
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper
from qexport.calib.collect import Collector
from qexport.exporter.fp_export import stamp
from qexport.exporter.simulate import simulated
from qexport.passes.analyze import find_groups
from qexport.passes.apply import pack_low_bit, run_passes
from qexport.passes.graph import producers
from qexport.passes.lowrank import branch_cost, lowrank_factors
from qexport.passes.plan import QuantConfig, Smooth, plan_range
from qexport.passes.quant import Grid, dequantize, qparams, quantize
from qexport.passes.rewrite import PassConfig
from qexport.targets.catalog import ORT_CPU
from qexport.verification.verify import integer_inputs
from sessions import cpu_session
from torch import nn

from qexport.errors import QexportError
from qexport.recipe import recipe_of

S4 = Grid(bits=4, storage="int4", symmetric=True)


def _gains(rng, channels):
    """Per-channel activation magnitudes with a few loud channels, as transformer inputs have."""
    gain = np.exp(rng.normal(0.0, 1.0, size=channels))
    gain[rng.choice(channels, 3, replace=False)] *= 20.0
    return gain


def test_lowrank_reduces_the_output_error_more_with_rank_and_with_weighting():
    rng = np.random.default_rng(0)
    w = rng.standard_normal((64, 48)) * 0.1
    scale, zero = qparams(w.min(0), w.max(0), S4)
    w_dq = dequantize(quantize(w, scale[None], zero[None], S4), scale[None], zero[None]).astype(np.float64)
    gain = _gains(rng, 64)
    calib = rng.standard_normal((512, 64)) * gain
    held_out = rng.standard_normal((512, 64)) * gain  # new samples from the same distribution
    d = np.abs(calib).max(axis=0)  # per-channel magnitude, as the statistics record it

    def error(rank, weights):
        if rank == 0:
            return np.linalg.norm(held_out @ (w - w_dq))
        a, b = lowrank_factors(w, w_dq, weights, rank)
        return np.linalg.norm(held_out @ (w - w_dq - a.astype(np.float64) @ b))

    errors = [error(r, d) for r in (0, 1, 4, 16, 32)]
    assert all(x > y for x, y in itertools.pairwise(errors)), errors
    assert errors[3] < 0.6 * errors[0], errors
    assert error(4, d) < error(4, np.ones(64)), "weighting by activation magnitude must help on skewed inputs"
    a, b = lowrank_factors(w, w_dq, np.where(np.arange(64) < 8, 0.0, d), 4)  # silent channels
    assert np.isfinite(a).all() and a.shape == (64, 4) and b.shape == (4, 48)
    assert lowrank_factors(w[:, :3], w_dq[:, :3], d, 32)[1].shape == (3, 3)  # capped at min(in, out)
    cost = branch_cost(10, a, b, out_features=48, in_features=64)
    assert cost.macs == 10 * 4 * (64 + 48) and cost.linear_macs == 10 * 64 * 48 and cost.bytes == 4 * 4 * (64 + 48)


class Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(16, 32)
        self.fc2 = nn.Linear(32, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.fc1(x)))


def _onnx(model: Tiny) -> onnx.ModelProto:
    """The tiny model as the FP export writes linears: MatMul(x, W^T) + Add(b)."""
    inits = [numpy_helper.from_array(v, n) for n, v in (
        ("w1", model.fc1.weight.detach().numpy().T.copy()), ("b1", model.fc1.bias.detach().numpy()),
        ("w2", model.fc2.weight.detach().numpy().T.copy()), ("b2", model.fc2.bias.detach().numpy()))]  # fmt: skip
    nodes = [
        helper.make_node("MatMul", ["x", "w1"], ["h0"], name="fc1/MatMul"),
        helper.make_node("Add", ["h0", "b1"], ["h1"], name="fc1/Add"),
        helper.make_node("Relu", ["h1"], ["h2"], name="relu"),
        helper.make_node("MatMul", ["h2", "w2"], ["y0"], name="fc2/MatMul"),
        helper.make_node("Add", ["y0", "b2"], ["y"], name="fc2/Add"),
    ]
    graph = helper.make_graph(nodes, "tiny", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 8, 16])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 8, 16])], inits)  # fmt: skip
    return onnx.shape_inference.infer_shapes(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)]))


def assert_runs_as_simulated(got: np.ndarray, sim: np.ndarray) -> None:
    """onnxruntime's output equals the simulation's to float rounding, token by token, but for rounding
    ties: onnxruntime computes a linear's output with integer GEMMs and torch with float ones, so an
    activation within an ulp of a midpoint between two integers may round apart at the next layer's
    input, and where that happens depends on the CPU (measured here: nowhere on these graphs; about 0.25
    ties expected per run of the 512-token GPTQ graph). One flipped integer moves Tiny's outputs by at
    most 0.3 LSB of an 8-bit grid over their range at fc2's input and 4.2 LSB at fc1's (bounded through
    |W1|·|W2|, measured on these plans). So at most two tokens may differ by more than float rounding,
    and none by more than 5 LSB."""
    apart = np.abs(got - sim) > 1e-4 * np.abs(sim).max()
    tokens = int(apart.reshape(-1, got.shape[-1]).any(axis=1).sum())
    lsb = float(sim.max() - sim.min()) / 255
    assert tokens <= 2 and np.abs(got - sim).max() <= 5 * lsb, (tokens, np.abs(got - sim).max() / lsb)


def _plan_and_graph(rank, w_bits=8):
    torch.manual_seed(0)
    model = Tiny().eval()
    gain = torch.exp(torch.randn(16)) * torch.where(torch.arange(16) < 2, 10.0, 1.0)
    calib = [torch.randn(2, 8, 16) * gain for _ in range(8)]
    collector = Collector({"fc1": model.fc1, "fc2": model.fc2}, steps=1, histograms=False, device=torch.device("cpu"))
    collector.samples = 2
    with torch.no_grad():
        for x in calib:
            model(x)
    stats = collector.close()
    graph = gs.import_onnx(_onnx(model))
    nodes = {"fc1": "fc1/MatMul", "fc2": "fc2/MatMul"}
    groups = find_groups(graph, nodes, {"fc1": 16, "fc2": 32})
    weights = {"fc1": np.asarray(graph.tensors()["w1"].values), "fc2": np.asarray(graph.tensors()["w2"].values)}
    biases = {"fc1": model.fc1.bias.detach().numpy(), "fc2": model.fc2.bias.detach().numpy()}
    config = QuantConfig(w_bits=w_bits, smooth=Smooth.ASQ, lowrank=rank)
    plan = plan_range([0], groups, stats, weights, biases, config, ORT_CPU)
    graph = run_passes(graph, PassConfig(plan=plan, groups=groups, nodes=nodes), ORT_CPU)
    emitted = pack_low_bit(gs.export_onnx(graph), plan)
    stamp(emitted)
    return model, plan, emitted, gain


def _optimized(model: onnx.ModelProto) -> tuple[ort.InferenceSession, onnx.ModelProto]:
    with tempfile.TemporaryDirectory() as tmp:
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        opts.optimized_model_filepath = str(Path(tmp) / "opt.onnx")
        session = cpu_session(model.SerializeToString(), opts)
        return session, onnx.load(opts.optimized_model_filepath)


def test_branch_reads_the_dequantized_input_keeps_integer_kernels_and_equals_simulation():
    model, plan, onnx_model, gain = _plan_and_graph(rank=4)
    made = producers(gs.import_onnx(onnx_model))
    for layer in ("fc1", "fc2"):
        lp = plan.layers[layer]
        assert lp.lowrank_a is not None and lp.lowrank_a.shape[1] == 4
        branch = [n for n in onnx_model.graph.node if f"{layer}::lowrank_a" in n.input]
        assert len(branch) == 1, f"layer {layer} has no low-rank branch"
        quantized = next(n for n in onnx_model.graph.node if n.op_type == "MatMul" and n.input[1] == f"{layer}::w_dq")
        assert branch[0].input[0] == quantized.input[0], f"the branch of {layer} must read the MatMul's input"
        assert made[branch[0].input[0]].op == "DequantizeLinear", f"Input of {layer}'s branch is not quantized!"
        add = next(n for n in onnx_model.graph.node if n.name == f"{layer}::lowrank_add")
        assert made[add.input[0]].op == "Add", "the branch must be added after the bias Add"
    session, optimized = _optimized(onnx_model)
    assert integer_inputs(optimized) >= {"fc1::w_q", "fc2::w_q"}, [n.op_type for n in optimized.graph.node]

    x = torch.randn(2, 8, 16) * gain
    got = session.run(None, {"x": x.numpy()})[0]
    with torch.no_grad():
        fp = model(x).numpy()
        with simulated(model, plan):
            sim = model(x).numpy()
    assert_runs_as_simulated(got, sim)
    *_, plain_model, _ = _plan_and_graph(rank=0)
    without = _optimized(plain_model)[0].run(None, {"x": x.numpy()})[0]
    assert np.abs(got - fp).sum() < np.abs(without - fp).sum()  # the branch moves the output towards FP


def test_w4_branch_runs_as_simulated():
    model, plan, onnx_model, gain = _plan_and_graph(rank=8, w_bits=4)
    x = torch.randn(2, 8, 16) * gain
    got = _optimized(onnx_model)[0].run(None, {"x": x.numpy()})[0]
    with torch.no_grad(), simulated(model, plan):
        sim = model(x).numpy()
    assert_runs_as_simulated(got, sim)


def test_rank_out_of_range_is_one_clear_error(tmp_path):
    for rank in (-1, 0, 33):
        with pytest.raises(QexportError, match=r"recipe key 'lowrank.rank' must be in 1\.\.32, got"):
            recipe_of(f"lowrank.rank={rank}")
    for how in (["--lowrank", "40"], ["--set", "lowrank.rank=40"]):  # the old option is an alias of the key
        proc = subprocess.run([sys.executable, "-c", "from qexport.cli import main; main()", "build",
                               str(tmp_path / "none.qstats"), *how, "-o", str(tmp_path / "out")],
                              capture_output=True, text=True)  # fmt: skip
        assert (
            proc.returncode == 2 and proc.stderr.strip() == "error: recipe key 'lowrank.rank' must be in 1..32, got 40"
        )


@pytest.mark.slow
def test_tiny_latte_lowrank_build_fuses_verifies_and_replans(latte_stats, tmp_path):
    from qexport.exporter.build import BuildConfig, build, replan
    from qexport.verification.verify import verify

    config = BuildConfig(recipe=recipe_of("smoothquant.mode=asq", "lowrank.rank=4", "granularity.time_ranges=1"))
    result = build(latte_stats, tmp_path / "lr", config)
    q = result.manifest["quantization"]
    assert q["lowrank"] == 4 and 0 < q["lowrank_cost"]["macs_per_call"] < q["lowrank_cost"]["linear_macs_per_call"]
    plan = result.ranges[0].plan
    v = verify(result.folder, result.adapter, [plan], result.manifest, ORT_CPU, "a red circle moving left")
    assert v.ok and all(len(m.integer) == 64 and not m.float_ for m in v.models), v.to_json()
    _, plans, _ = replan(result.manifest, latte_stats)
    for name, lp in plan.layers.items():
        assert np.array_equal(plans[0].layers[name].lowrank_a, lp.lowrank_a), name
        assert np.array_equal(plans[0].layers[name].lowrank_b, lp.lowrank_b), name
