"""Peak host memory of a pipeline's text part export, per storage precision: a T5 encoder of
T5-XXL's width with --layers layers (random weights; 3 layers: 0.71 B parameters, 2.8 GB of FP32
weights, over protobuf's 2 GB, so the export keeps its weights in external data, as a full-size
T5-XXL's does), exported by qexport's text-part export, each precision in its own process. Prints
the export's peak RSS and its rise over the RSS with the encoder loaded, both over the encoder's
FP32 weight bytes.

    python bench/part_memory.py --layers 3 --json part.json
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
XXL_WIDTH = {"d_model": 4096, "d_kv": 64, "d_ff": 10240, "num_heads": 64, "vocab_size": 32128}


def _rss() -> int:
    """The process's resident bytes now."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def _child(layers: int, precision: str) -> dict[str, Any]:
    import torch
    import transformers
    from qexport.exporter.text_encoders import TextPart, export_text_part

    from qexport.recipe import PartPrecision

    spec = importlib.util.spec_from_file_location("qexport_test_pipelines", ROOT / "tests" / "pipelines.py")
    assert spec is not None and spec.loader is not None
    tests = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tests)
    torch.manual_seed(0)
    tokenizer = tests.t5_tokenizer()
    config = transformers.T5Config(**{**tests._t5_config(tokenizer), **XXL_WIDTH, "num_layers": layers})
    encoder = transformers.T5EncoderModel(config).eval()
    weights = sum(p.numel() * p.element_size() for p in encoder.parameters())
    loaded = _rss()
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as folder:
        part = TextPart(name="text_encoder", tokenizer=tokenizer, encoder=encoder)
        spec_out = export_text_part(part, Path(folder), 16, PartPrecision(precision))
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"precision": precision, "seconds": time.perf_counter() - start, "weights_bytes": weights,
            "rss_loaded": loaded, "peak_rss": peak, "external_data": spec_out["data"]}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=3)
    parser.add_argument("--precisions", nargs="+", default=["fp32", "fp16", "int8-weights"])
    parser.add_argument("--json", type=Path, required=True)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    a = parser.parse_args()
    if a.child:
        print(json.dumps(_child(a.layers, a.child)))
        return
    rows = []
    for precision in a.precisions:
        cmd = [sys.executable, "-P", __file__, "--layers", str(a.layers), "--json", str(a.json), "--child", precision]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode:
            sys.exit(f"{precision}: the export failed:\n{done.stderr[-3000:]}")
        rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
    a.json.write_text(json.dumps({"layers": a.layers, "rows": rows}, indent=1))
    gib = 2**30
    print(f"T5 encoder, XXL width, {a.layers} layer(s): {rows[0]['weights_bytes'] / gib:.2f} GiB of FP32 weights")
    head = f"{'precision':<14} {'export s':>9} {'loaded GiB':>11} {'peak GiB':>9} {'peak/W':>7} {'rise/W':>7}"
    print(head + "  external data")
    for r in rows:
        w, rise = r["weights_bytes"], r["peak_rss"] - r["rss_loaded"]
        print(f"{r['precision']:<14} {r['seconds']:>9.1f} {r['rss_loaded'] / gib:>11.2f} {r['peak_rss'] / gib:>9.2f}"
              f" {r['peak_rss'] / w:>7.2f} {rise / w:>7.2f}  {r['external_data']}")  # fmt: skip


if __name__ == "__main__":
    main()
