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
import json
import random
import resource
import sys
import tempfile
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # the mutators live beside their tests

from qexport.calib.store import load
from qstats_mutations import MUTATORS, Case, base_files, run_case

KINDS = ("error", "identical", "valid", "other")
LIMIT_S = 5.0


def _rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


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
        before = _rss_mib()
        for _ in range(cases):
            mutator, base, case_seed = master.choice(names), master.choice(sorted(bases)), master.getrandbits(32)
            case = run_case(folder / "case.qstats", bases, originals, mutator, base, random.Random(case_seed))
            case.detail = f"seed {case_seed}: {case.detail}" if case.kind == "other" else ""
            out.append(case)
    return out, {"rss_before_mib": before, "peak_rss_mib": _rss_mib()}


def table(cases: list[Case], memory: dict[str, float]) -> list[str]:
    """Markdown rows: one per mutator, then the total."""
    rows = ["| mutator | cases | clean error | identical | valid (resealed) | other | max s/case |",
            "|---|---|---|---|---|---|---|"]  # fmt: skip
    by: dict[str, list[Case]] = {}
    for c in cases:
        by.setdefault(c.mutator, []).append(c)
    for name, group in [*sorted(by.items()), ("**total**", cases)]:
        n = Counter(c.kind for c in group)
        slowest = max(c.seconds for c in group)
        rows.append(f"| {name} | {len(group)} | " + " | ".join(str(n[k]) for k in KINDS) + f" | {slowest:.3f} |")
    rows.append(f"\npeak memory: {memory['peak_rss_mib']:.0f} MiB resident ({memory['rss_before_mib']:.0f} MiB "
                "before the first case: Python, numpy, torch for the small file)")  # fmt: skip
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", type=int, default=10_000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, help="also write the counts and findings here")
    args = parser.parse_args(argv)
    cases, memory = fuzz(args.cases, args.seed)
    print("\n".join(table(cases, memory)))
    bad = [c for c in cases if c.kind == "other" or c.seconds >= LIMIT_S]
    for c in bad:
        print(f"FINDING {c.mutator} on {c.base} ({c.seconds:.2f}s): {c.detail}")
    if args.json:
        counts = {m: dict(Counter(c.kind for c in cases if c.mutator == m)) for m in sorted({c.mutator for c in cases})}
        findings = [{"mutator": c.mutator, "base": c.base, "seconds": c.seconds, "detail": c.detail} for c in bad]
        args.json.write_text(json.dumps({"cases": args.cases, "seed": args.seed, "counts": counts, **memory,
                                         "max_seconds": max(c.seconds for c in cases), "findings": findings},
                                        indent=1))  # fmt: skip
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
