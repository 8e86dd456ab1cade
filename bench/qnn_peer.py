"""qexport's qnn-htp builds against onnxruntime's own QNN flow, on Qualcomm's HTP backend (the
onnxruntime-qnn simulator, CPU fallback off), side by side in one run.

    python bench/qnn_peer.py --stats s20.qstats --builds w8a16=b16 w8a8=b8 --step 10 --json qnn_peer.json

onnxruntime's flow quantizes the single FP ONNX (timestep as an input) the way its QNN docs say:
``qnn_preprocess_model``, then ``get_qnn_qdq_config`` + ``quantize``, calibrated on the same
prompts' per-step denoiser inputs (aggregated over steps: it has no notion of steps), at A16W8 and
A8W8. Its FP model first gets qexport's layout rewrite for HTP (rank <= 4 patchify / unpatchify, the
one-input Einsum as a Transpose): without it the HTP backend refuses the graph. Every model then
runs step `--step` of a held-out prompt's FP trajectory on HTP, and its output is compared with
the FP denoiser's (SQNR, cosine). qexport's builds are given as folders (built beforehand with
``--target qnn-htp``).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path
from typing import Any, cast

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import torch
from peers import FeedReader, export_fp_model, step_feeds
from qexport.calib.store import load
from qexport.passes.layout import legalize_layout
from qexport.targets.catalog import get_profile

from qexport.metrics import cosine, sqnr_db
from qexport.models.registry import load_model
from qexport.runtime.qnn import open_htp

HELD_OUT = "a magenta triangle moving down"


def ort_qnn_flow(fp: Path, out: Path, feeds: list[dict], activation_bits: int) -> float:
    """onnxruntime's QNN quantization of `fp` (weights int8 per channel, activations uint8 or uint16)."""
    from onnxruntime.quantization import QuantType, quantize
    from onnxruntime.quantization.execution_providers.qnn import get_qnn_qdq_config, qnn_preprocess_model

    start = time.perf_counter()
    pre = out.with_name(out.stem + ".pre.onnx")
    changed = qnn_preprocess_model(str(fp), str(pre))
    source = pre if changed else fp
    activation = QuantType.QUInt16 if activation_bits == 16 else QuantType.QUInt8
    config = get_qnn_qdq_config(str(source), FeedReader(feeds), activation_type=activation,
                                weight_type=QuantType.QInt8, per_channel=True)  # fmt: skip
    quantize(str(source), str(out), config)
    onnx.checker.check_model(str(out))
    return time.perf_counter() - start


def htp_laid_out(fp: Path, out: Path) -> Path:
    """The FP model with qexport's HTP layout rewrite (no quantization involved)."""
    graph = gs.import_onnx(onnx.shape_inference.infer_shapes(onnx.load(str(fp))))  # the rewrite reads shapes
    graph = legalize_layout(graph, cast(Any, None), get_profile("qnn-htp"))
    model = gs.export_onnx(graph)
    onnx.save(model, str(out), save_as_external_data=True, location=out.name + ".data", size_threshold=1024)
    return out


def on_htp(path: Path, feeds: dict[str, np.ndarray]) -> tuple[np.ndarray, float, float]:
    """Run once on HTP, CPU fallback off. onnxruntime's flow quantizes the graph inputs with Q nodes
    its QNN EP leaves to the CPU by default (offload_graph_io_quantization); they are kept on HTP
    here, so that no node of either flow runs elsewhere."""
    start = time.perf_counter()
    session = open_htp(path, get_profile("qnn-htp").fp16_soc, settings={"offload_graph_io_quantization": "0"})
    opened = time.perf_counter() - start
    names = {i.name for i in session.get_inputs()}
    start = time.perf_counter()
    out = session.run(None, {k: v for k, v in feeds.items() if k in names})[0]
    return np.asarray(out), opened, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--stats", type=Path, required=True, help="the calibration the builds used (its prompts)")
    parser.add_argument("--builds", nargs="*", default=[], help="NAME=FOLDER of qexport qnn-htp builds")
    parser.add_argument("--step", type=int, default=10)
    parser.add_argument("--json", type=Path, required=True)
    a = parser.parse_args()
    header = load(a.stats).header
    adapter = load_model(str(header["model_id"]))
    steps, cfg = int(header["steps"]), float(header["cfg"])
    rows: dict[str, Any] = {}

    # the held-out prompt's FP denoiser input at the step, and the FP output there
    seen: list[dict[str, np.ndarray]] = step_feeds(adapter, [HELD_OUT], [0], steps, cfg)
    feeds = seen[a.step]
    with torch.no_grad():
        fp = adapter.denoiser()(*(torch.from_numpy(feeds[k]) for k in ("latents", "timestep", "cond"))).numpy()

    def record(name: str, path: Path, **extra: Any) -> None:
        out, opened, ran = on_htp(path, feeds)
        rows[name] = {"sqnr_fp_db": sqnr_db(fp, out), "cosine_fp": cosine(fp, out), "open_s": round(opened, 1),
                      "run_s": round(ran, 1), **extra}  # fmt: skip
        print(name, json.dumps(rows[name]), flush=True)
        a.json.write_text(json.dumps({"step": a.step, "prompt": HELD_OUT, "rows": rows}, indent=1))

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        fp_path = htp_laid_out(export_fp_model(adapter, root / "raw.onnx"), root / "fp.onnx")
        calib = step_feeds(adapter, list(header["prompt_texts"]), [0], steps, cfg)
        for bits in (16, 8):
            out = root / f"ort_a{bits}w8.onnx"
            seconds = ort_qnn_flow(fp_path, out, calib, bits)
            record(f"onnxruntime QNN flow A{bits}W8", out, quantize_s=round(seconds, 1))
    for spec in a.builds:
        name, _, folder = spec.partition("=")
        manifest = json.loads((Path(folder) / "manifest.json").read_text())
        model = next(r["model"] for r in manifest["ranges"] if a.step in r["steps"])
        record(f"qexport {name}", Path(folder) / model)


if __name__ == "__main__":
    main()
