import os

import pytest
import torch

# two threads unless the run asks for another count (the suite is run with OMP_NUM_THREADS=1 too)
torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))
if os.environ.get("QEXPORT_TEST_DETERMINISTIC") == "1":
    torch.use_deterministic_algorithms(True)  # another math setting the suite must pass under


@pytest.fixture(scope="session")
def smoke_models(tmp_path_factory):
    """Both built-in architectures trained for 3 CPU steps by the real training script."""
    from qexport.models import train

    root = tmp_path_factory.mktemp("smoke")
    for name in ("tiny-latte", "tiny-dit"):
        train.main(["--model", name, "--out", str(root / name), "--smoke"])
    return root


@pytest.fixture(scope="session")
def latte_stats(tmp_path_factory):
    """A 4-step calibration of the built-in tiny-latte on two prompts."""
    from qexport.calib.run import CalibConfig, calibrate
    from qexport.calib.store import save

    from qexport.models.registry import load_model
    from qexport.models.sampler import SamplingConfig

    adapter = load_model("tiny-latte")
    prompts = ("a red circle moving left", "a blue square moving up")
    path = tmp_path_factory.mktemp("stats") / "latte.qstats"
    config = CalibConfig(prompts=prompts, sampling=SamplingConfig(steps=4, cfg=7.0), batch_size=2)
    save(calibrate(adapter, config).stats, path)
    return path


@pytest.fixture(scope="session")
def latte_fp(latte_stats):
    """tiny-latte exported to FP ONNX for latte_stats' layers: (adapter, stats, export, feeds), the
    feeds one step's random latents and null conditioning. Graphs come from
    ``StepGraphs(load_graph(export)).at(t)``, a fresh one per call."""
    import numpy as np
    from qexport.calib.store import load
    from qexport.exporter.fp_export import export_fp, prepare

    from qexport.models.registry import load_model

    adapter = load_model("tiny-latte")
    stats = load(latte_stats)
    fp = prepare(export_fp(adapter, list(stats.layers)))
    rng = np.random.default_rng(0)
    feeds = {"latents": rng.standard_normal((2, 3, 16, 32, 32)).astype(np.float32),
             "cond": adapter.conditioner.null(2).numpy()}  # fmt: skip
    return adapter, stats, fp, feeds


@pytest.fixture
def bare_stats(latte_stats, tmp_path):
    """latte_stats without its recorded prompts (as written by an older qexport)."""
    from qexport.calib.store import load, save

    stats = load(latte_stats)
    stats.header.pop("prompt_texts")
    bare = tmp_path / "bare.qstats"
    save(stats, bare)
    return bare
