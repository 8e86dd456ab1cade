"""A minimal reproducer, onnxruntime and onnxruntime-qnn only (no qexport), for loading a QNN context
binary that holds more than one graph on the x86-64 HTP simulator: two one-MatMul QDQ models
(uint8 activations, int8 weights), compiled in one process into one shared context
(``ep.share_ep_contexts``, ``ep.stop_share_ep_contexts`` on the last, embed mode 0) and, as the
control, each into a context of its own; every context model is then opened and run in a child
process, whose exit (a signal included) is printed with the output's largest difference from the
compiling session's.

    python bench/qnn_shared_load.py [--graphs 2] [--size 64] [--soc 57] [--load-unshared]

Where the shared context loads, each graph's output equals its compiling session's (0.0).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper


def qdq_matmul(path: Path, size: int, seed: int) -> None:
    """x (float) -> Q/DQ uint8 -> MatMul with a DQ'd int8 weight [size, size] -> Q/DQ uint8 -> y."""
    rng = np.random.default_rng(seed)
    weight = rng.integers(-127, 128, (size, size), dtype=np.int8)
    inits = [
        numpy_helper.from_array(weight, "w_q"),
        numpy_helper.from_array(np.array(0.01, np.float32), "w_scale"),
        numpy_helper.from_array(np.array(0, np.int8), "w_zero"),
        numpy_helper.from_array(np.array(0.02, np.float32), "x_scale"),
        numpy_helper.from_array(np.array(128, np.uint8), "x_zero"),
        numpy_helper.from_array(np.array(0.5, np.float32), "y_scale"),
        numpy_helper.from_array(np.array(128, np.uint8), "y_zero"),
    ]
    nodes = [
        helper.make_node("QuantizeLinear", ["x", "x_scale", "x_zero"], ["x_q"]),
        helper.make_node("DequantizeLinear", ["x_q", "x_scale", "x_zero"], ["x_dq"]),
        helper.make_node("DequantizeLinear", ["w_q", "w_scale", "w_zero"], ["w_dq"]),
        helper.make_node("MatMul", ["x_dq", "w_dq"], ["y_f"]),
        helper.make_node("QuantizeLinear", ["y_f", "y_scale", "y_zero"], ["y_q"]),
        helper.make_node("DequantizeLinear", ["y_q", "y_scale", "y_zero"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes,
        f"g{seed}",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, size])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, size])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    model.ir_version = 10
    onnx.checker.check_model(model)
    onnx.save(model, str(path))


def session(path: Path, soc: str, config: dict[str, str]) -> ort.InferenceSession:
    """`path` on the HTP backend, CPU fallback off."""
    import onnxruntime_qnn as oq

    name = oq.get_ep_name()
    if name not in {d.ep_name for d in ort.get_ep_devices()}:
        ort.register_execution_provider_library(name, oq.get_library_path())
    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.add_session_config_entry("session.disable_cpu_ep_fallback", "1")
    for key, value in config.items():
        options.add_session_config_entry(key, value)
    provider = {"backend_path": oq.get_qnn_htp_path(), **({"soc_model": soc} if soc else {})}
    options.add_provider_for_devices([d for d in ort.get_ep_devices() if d.ep_name == name], provider)
    return ort.InferenceSession(str(path), options)


def compile_contexts(models: list[Path], out: Path, soc: str, shared: bool, x: np.ndarray) -> list[np.ndarray]:
    """Each model compiled to out/<stem>_ctx.onnx (one binary for all where shared); the outputs of
    the compiling sessions on x."""
    outputs = []
    for i, model in enumerate(models):
        config = {"ep.context_enable": "1", "ep.context_embed_mode": "0",
                  "ep.context_file_path": str(out / f"{model.stem}_ctx.onnx")}  # fmt: skip
        if shared:
            config["ep.share_ep_contexts"] = "1"
            if i == len(models) - 1:
                config["ep.stop_share_ep_contexts"] = "1"
        outputs.append(session(model, soc, config).run(None, {"x": x})[0])
    return outputs


def load_in_child(contexts: list[Path], soc: str, shared: bool, x: Path) -> dict[str, Any]:
    """Open and run each context model in a child process (shared: with ep.share_ep_contexts, as
    onnxruntime documents for a multi-graph binary): its exit and last stderr line."""
    job = json.dumps({"contexts": [str(c) for c in contexts], "soc": soc, "shared": shared, "x": str(x)})
    done = subprocess.run([sys.executable, __file__, "--child", job], capture_output=True, text=True, timeout=600)
    how = "exit 0" if done.returncode == 0 else (
        f"signal {-done.returncode}" if done.returncode < 0 else f"exit {done.returncode}")  # fmt: skip
    tail = (done.stderr.strip().splitlines() or [""])[-1]
    return {"exit": how, "stderr": tail}


def _child(job: dict[str, Any]) -> None:
    config = {"ep.share_ep_contexts": "1"} if job["shared"] else {}
    x = np.load(job["x"])
    for path in map(Path, job["contexts"]):
        print(f"opening {path.name}", file=sys.stderr, flush=True)
        np.save(path.with_suffix(".out.npy"), session(path, job["soc"], config).run(None, {"x": x})[0])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--graphs", type=int, default=2)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--soc", default="57", help="QNN soc_model ('' for the backend's default)")
    parser.add_argument(
        "--load-unshared", action="store_true", help="open the shared context's graphs without ep.share_ep_contexts"
    )
    parser.add_argument("--child", help=argparse.SUPPRESS)
    a = parser.parse_args()
    if a.child:
        _child(json.loads(a.child))
        return
    import onnxruntime_qnn as oq

    print(f"onnxruntime {ort.__version__}, onnxruntime-qnn {getattr(oq, '__version__', '?')}, soc_model {a.soc or '-'}")
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        x = np.random.default_rng(1).standard_normal((1, a.size)).astype(np.float32)
        np.save(root / "x.npy", x)
        models = []
        for i in range(a.graphs):
            models.append(root / f"m{i}.onnx")
            qdq_matmul(models[-1], a.size, seed=i)
        for shared in (False, True):
            out = root / ("shared" if shared else "per_model")
            out.mkdir()
            reference = compile_contexts(models, out, a.soc, shared, x)
            contexts = [out / f"{m.stem}_ctx.onnx" for m in models]
            binaries = sorted(p.name for p in out.glob("*.bin"))
            result = load_in_child(contexts, a.soc, shared and not a.load_unshared, root / "x.npy")
            ran = [(np.load(c.with_suffix(".out.npy")), r) for c, r in zip(contexts, reference, strict=True)
                   if c.with_suffix(".out.npy").exists()]  # fmt: skip
            diffs = [float(np.abs(got - want).max()) for got, want in ran]
            label = "one shared context" if shared else "a context per graph"
            print(f"{a.graphs} graphs, {label}: {len(binaries)} binary file(s); loaded and run in a child: "
                  f"{result['exit']}; graphs run {len(diffs)} of {a.graphs}, max |diff| vs compiling session "
                  f"{max(diffs) if diffs else '-'}; child's last line: {result['stderr'] or '-'}")  # fmt: skip


if __name__ == "__main__":
    main()
