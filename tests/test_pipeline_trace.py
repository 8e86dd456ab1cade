"""Real diffusers pipelines run by their own __call__: the folder loads by its model_index.json,
the traced run is the untraced run, and the scheduler the build probes from the folder replays
the pipeline's own trajectory step by step (its scheduler set up as the pipeline set it up)."""

import numpy as np
import pytest
import torch

pytest.importorskip("transformers", minversion="5", reason="the tiny pipelines need transformers>=5")

from pipelines import FAMILIES, call_kwargs

from qexport.errors import QexportError
from qexport.models.pipeline import load_pipeline, trace_call
from qexport.models.scheduler import CHECK_RTOL, check, probe
from qexport.runtime.scheduler import EdgeScheduler

STEPS = 4  # enough for the multistep solvers to read back


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("pipelines")
    return {name: make(root) for name, make in FAMILIES.items()}


@pytest.mark.parametrize("family", list(FAMILIES))
def test_the_probed_scheduler_replays_the_pipelines_own_trajectory(folders, family):
    if family == "wan2.1":
        pytest.importorskip("accelerate", reason="diffusers loads WanTransformer3DModel only with accelerate")
    pipe = load_pipeline(folders[family])
    kwargs = {**call_kwargs(family, output_type="latent"), "num_inference_steps": STEPS}
    trace = trace_call(pipe, **kwargs)
    plain = pipe(**{**kwargs, "generator": torch.Generator("cpu").manual_seed(kwargs["generator"].initial_seed())})
    got, want = (r[0] if isinstance(r, tuple) else next(iter(r.values())) for r in (trace.output, plain))
    assert np.array_equal(np.asarray(got), np.asarray(want))  # tracing does not change the run

    n = len(trace.samples)
    assert n == STEPS and all(any(c.step == i for c in trace.calls) for i in range(n))
    assert all("hidden_states" in c.tensors or "arg0" in c.tensors for c in trace.calls)
    block = probe(trace.scheduler, n, trace.set_timesteps)
    assert max(check(trace.scheduler, block)) <= CHECK_RTOL
    assert [s["timestep"] for s in block["steps"]] == pytest.approx(trace.timesteps, rel=1e-6)
    edge = EdgeScheduler(block, seed=0)
    for i in range(n):  # the edge step from the pipeline's own sample and guided output
        x = edge.step(i, trace.samples[i].astype(np.float32), trace.outputs[i].astype(np.float32))
        ref = trace.results[i]
        assert np.linalg.norm(x - ref) <= 1e-5 * np.linalg.norm(ref), (i, np.linalg.norm(x - ref) / np.linalg.norm(ref))


def test_a_folder_missing_a_component_or_its_index_is_one_clear_error(folders, tmp_path):
    import shutil

    with pytest.raises(QexportError, match=r"has no model_index\.json"):
        load_pipeline(tmp_path)
    copy = tmp_path / "pixart"
    shutil.copytree(folders["pixart-alpha"], copy)
    shutil.rmtree(copy / "text_encoder")
    with pytest.raises(
        QexportError, match=r"names a T5EncoderModel component .text_encoder. in model_index\.json but has no"
    ):
        load_pipeline(copy)
