"""The whole sampling loop of a qnn-htp build with every step model on Qualcomm's HTP backend (the
onnxruntime-qnn simulator, CPU fallback off; from the build's context binaries when it has them),
beside the same loop on onnxruntime's CPU provider, both against FP from the same noise.

    python bench/qnn_loop.py BUILD --stats s20.qstats --prompts 3 --json loop.json

Prompts are the first N of the built-in evaluation set that the calibration did not use (--skip K
leaves out the first K of them, to run a long set in parts). The
simulator is host emulation: its time per step says nothing about an NPU's.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from qexport.calib.store import load
from qexport.verification.verify import end_to_end

from qexport.models.fp_eval import default_prompts
from qexport.models.registry import load_model
from qexport.models.sampler import SamplingConfig
from qexport.runtime.manifest import read_manifest
from qexport.runtime.qnn import model_opener


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("build", type=Path)
    parser.add_argument("--stats", type=Path, required=True)
    parser.add_argument("--prompts", type=int, default=3)
    parser.add_argument("--skip", type=int, default=0, help="leave out the first K of them")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, required=True)
    a = parser.parse_args()
    header = load(a.stats).header
    adapter = load_model(str(header["model_id"]))
    manifest = read_manifest(a.build)
    config = SamplingConfig(steps=len(manifest["steps"]), cfg=float(manifest["cfg"]))
    used = set(header["prompt_texts"])
    prompts = [p for p in default_prompts(adapter) if p not in used][a.skip : a.prompts]
    opener = model_opener(a.build, manifest)
    rows = []
    for prompt in prompts:
        start = time.perf_counter()
        both = end_to_end(a.build, adapter, prompt, a.seed, config, openers={"_cpu": None, "_htp": opener})
        loops = {side: {k.removesuffix(f"_{side}"): v for k, v in both.items() if k.endswith(f"_{side}")}
                 for side in ("cpu", "htp")}  # fmt: skip
        rows.append({"prompt": prompt, **loops, "seconds": round(time.perf_counter() - start, 1)})
        print(json.dumps(rows[-1]), flush=True)
        mean = {k: sum(r[k]["psnr_db"] for r in rows) / len(rows) for k in ("cpu", "htp")}
        result = {"build": str(a.build), "contexts": (manifest.get("contexts") or {}).get("mode"), "rows": rows,
                  "mean_psnr_db": mean}  # fmt: skip
        a.json.write_text(json.dumps(result, indent=1))
    print(f"mean PSNR vs FP over {len(rows)} prompt(s): onnxruntime CPU {mean['cpu']:.2f} dB, HTP {mean['htp']:.2f} dB")


if __name__ == "__main__":
    main()
