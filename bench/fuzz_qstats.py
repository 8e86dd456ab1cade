"""Fuzz the .qstats reader: N mutated files (tests/qstats_mutations.py's mutators over a real
calibration and a small pipeline-style one with histograms), each loaded once and classified.

    python bench/fuzz_qstats.py --cases 10000 --seed 0 [--json fuzz.json]

Prints one row per mutator and a total: clean errors (one QexportError line), files loaded
identical to the original, resealed edits loaded as a valid file, anything else (a finding: its
mutator, base and seed are printed to reproduce it), the slowest case and the peak memory.
Exit status 1 if any case is "other" or takes 5 s or more.
"""

from __future__ import annotations

import argparse
import random
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # the mutators live beside their tests

from fuzz_report import findings, rss_mib, table
from qexport.calib.store import load
from qstats_mutations import MUTATORS, Case, base_files, run_case


def fuzz(cases: int, seed: int) -> tuple[list[Case], dict[str, float]]:
    """Run `cases` mutations drawn from `seed`; returns every case and the memory figures (MiB)."""
    master = random.Random(seed)
    names = sorted(MUTATORS)
    out: list[Case] = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        bases = base_files(folder)
        originals = {}
        for name, blob in bases.items():
            (folder / f"{name}.qstats").write_bytes(blob)
            originals[name] = load(folder / f"{name}.qstats")
        before = rss_mib()
        for _ in range(cases):
            mutator, base, case_seed = master.choice(names), master.choice(sorted(bases)), master.getrandbits(32)
            case = run_case(folder / "case.qstats", bases, originals, mutator, base, random.Random(case_seed))
            case.detail = f"seed {case_seed}: {case.detail}" if case.kind == "other" else ""
            out.append(case)
    return out, {"rss_before_mib": before, "peak_rss_mib": rss_mib()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", type=int, default=10_000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, help="also write the counts and findings here")
    args = parser.parse_args(argv)
    cases, memory = fuzz(args.cases, args.seed)
    print("\n".join(table(cases, memory, "valid (resealed)", "Python, numpy, torch for the small file")))
    return findings(cases, memory, args.seed, args.json)


if __name__ == "__main__":
    sys.exit(main())
