"""Markdown rows for docs/lab/w8a8-study.md ("Low-rank compensation") from `qexport eval` JSON files and
the builds' manifests: PSNR, SSIM, adherence, SQNR/step, disk, and what the branches add.

    python bench/lowrank_table.py eval_w4a8.json eval_w8a8.json [...]

Each build folder named in an eval JSON must still exist (its manifest gives bits, rank, cost).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def row(folder: str, scores: dict) -> str:
    q = json.loads((Path(folder) / "manifest.json").read_text())["quantization"]
    cost = q.get("lowrank_cost", {})
    macs, linear = cost.get("macs_per_call", 0), cost.get("linear_macs_per_call", 0)
    added = f"{macs / 1e6:.0f} M ({100 * macs / linear:.1f}%)" if macs else "0"
    extra = f"{cost.get('bytes_per_model', 0) / 2**10:.0f}"
    sq = scores["step_sqnr_db"]
    name = f"W{q['w_bits']}A{q['a_bits']} {q['smooth'].upper()}" + (" +rot" if q.get("rotate") else "")
    return (
        f"| {name} | {q.get('lowrank', 0)} | {scores['psnr_db']:.2f} | {scores['ssim']:.3f} | "
        f"{scores['adherence']:.3f} | {sum(sq) / len(sq):.1f} | {scores['model_mib']:.2f} | {added} | {extra} |"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("evals", nargs="+", type=Path)
    args = parser.parse_args()
    print("| build | rank | PSNR dB | SSIM | adherence | SQNR/step dB | disk MiB | MACs added per call | KiB added |")
    print("|---|---|---|---|---|---|---|---|---|")
    for path in args.evals:
        data = json.loads(path.read_text())
        for folder, scores in data["builds"].items():
            print(row(folder if Path(folder).is_absolute() else str(path.parent / folder), scores))


if __name__ == "__main__":
    main()
