"""Size of a QNN context binary holding the given step models of a qnn-htp build, compiled only
(no runs, no load check): with the session options of ``qexport contexts --mode shared``
(``ep.share_ep_contexts``, ``ep.stop_share_ep_contexts`` on the last), or as a per-model context.
A model may be named more than once (identical graphs); each is then compiled from its own copy.

    python bench/qnn_context_size.py BUILD step_05.onnx step_06.onnx [--per-model]

Needs the onnxruntime-qnn extra; the HTP simulator compiles a tiny-latte step in 30-45 s on 2 cores.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

from qexport.exporter.emit import WEIGHTS_FILE

from qexport.runtime.manifest import read_manifest
from qexport.runtime.qnn import open_htp, soc_of


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("build", type=Path)
    parser.add_argument("models", nargs="+")
    parser.add_argument("--per-model", action="store_true", help="one model, without the sharing options")
    a = parser.parse_args()
    soc = soc_of(read_manifest(a.build))
    with tempfile.TemporaryDirectory() as tmp:
        src, out = Path(tmp) / "src", Path(tmp) / "out"
        src.mkdir()
        out.mkdir()
        shutil.copy(a.build / WEIGHTS_FILE, src / WEIGHTS_FILE)  # external data must sit beside the model
        for i, model in enumerate(a.models):
            copy = src / f"{i:02d}_{model}"
            shutil.copy(a.build / model, copy)
            config = {"ep.context_enable": "1", "ep.context_embed_mode": "0",
                      "ep.context_file_path": str(out / f"{copy.stem}_ctx.onnx")}  # fmt: skip
            if not a.per_model:
                config["ep.share_ep_contexts"] = "1"
                if i == len(a.models) - 1:
                    config["ep.stop_share_ep_contexts"] = "1"
            start = time.perf_counter()
            session = open_htp(copy, soc, config=config)
            del session
            print(f"compiled {model} in {time.perf_counter() - start:.1f} s", flush=True)
        binaries = sorted(out.glob("*.bin"))
        total = sum(p.stat().st_size for p in binaries)
    print(f"{len(a.models)} graph(s), {len(binaries)} binary file(s): {total / 1e6:.2f} MB")


if __name__ == "__main__":
    main()
