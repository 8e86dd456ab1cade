"""A fixed set of builds from given statistics, each folder's emitted files hashed: run it before and
after a change that must not move any number (a speed-up, a refactor), and compare the two JSON
files. The set covers smoothing per step, the channel shift, the searches, GPTQ, 4-bit weights and
the rotations with the weight clip on tiny-latte, and the plain per-step build of a DiT.

    python bench/reference_builds.py --latte tl4.qstats --dit dit2.qstats --json before.json
    (change the code)
    python bench/reference_builds.py --latte tl4.qstats --dit dit2.qstats --json after.json --against before.json

tl4.qstats: `qexport calibrate --model tiny-latte --steps 4 ...`; dit2.qstats: `qexport calibrate
--model dit-b-2 --labels 1,2,3,4,5,6,7,8 --batch-size 8 --steps 2`. Each build runs `qexport build`
in its own process, unverified; the hash is over every emitted .onnx and .bin file (names and bytes).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

LATTE = {
    "best_gptq": ["--recipe", "w8a8-best", "--set", "gptq=on", "--set", "replay.prompts=2"],
    "tsq_tsw": ["--recipe", "w8a8-tsq-tsw"],
    "w4_gptq": ["--recipe", "w4a8-tsq-tsw-gptq"],
    "rotations_clip": ["--recipe", "w8a8-tsq-tsw", "--set", "head_rotation=on", "--set", "online_rotation=on",
                       "--set", "weight_clip=on"],
}  # fmt: skip
DIT = {"tsq_tsw": ["--recipe", "w8a8-tsq-tsw"]}


def folder_hash(folder: Path) -> str:
    """sha256 over the emitted models and weight files, in name order."""
    h = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.suffix in (".onnx", ".bin")):
        h.update(str(path.relative_to(folder)).encode())
        h.update(path.read_bytes())
    return h.hexdigest()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--latte", type=Path, required=True, help="a tiny-latte .qstats")
    parser.add_argument("--dit", type=Path, help="a DiT .qstats (optional)")
    parser.add_argument("--json", type=Path, required=True)
    parser.add_argument("--against", type=Path, help="an earlier run's JSON: name each build that differs")
    a = parser.parse_args()
    jobs = [(f"latte_{name}", a.latte, args) for name, args in LATTE.items()]
    jobs += [(f"dit_{name}", a.dit, args) for name, args in DIT.items()] if a.dit else []
    rows: dict[str, dict[str, object]] = {}
    with tempfile.TemporaryDirectory(prefix="qexport-ref-") as tmp:
        for name, stats, args in jobs:
            out = Path(tmp) / name
            start = time.perf_counter()
            done = subprocess.run([sys.executable, "-m", "qexport", "build", str(stats), *args, "-o", str(out),
                                   "--no-verify", "--force"], capture_output=True, text=True)  # fmt: skip
            if done.returncode:
                sys.exit(f"{name}: the build failed: {(done.stderr.strip().splitlines() or ['?'])[-1]}")
            rows[name] = {"hash": folder_hash(out), "seconds": round(time.perf_counter() - start, 1)}
            print(f"{name:24s} {rows[name]['hash'][:16]}  {rows[name]['seconds']:7.1f} s", flush=True)
    a.json.write_text(json.dumps(rows, indent=1))
    if a.against:
        before = json.loads(a.against.read_text())
        differ = [n for n in rows if n in before and before[n]["hash"] != rows[n]["hash"]]
        print(f"{len(rows) - len(differ)} of {len(rows)} builds byte-identical" + (f"; differ: {', '.join(differ)}"
                                                                                   if differ else ""))  # fmt: skip
        sys.exit(1 if differ else 0)


if __name__ == "__main__":
    main()
