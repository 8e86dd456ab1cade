"""What a fuzz run of a reader prints (bench/fuzz_qstats.py, bench/fuzz_manifest.py): one row per
mutator and a total of the outcomes, the slowest case and the peak memory; each finding (an outcome
other than a clean error, the original, or a valid resealed file; or a case of 5 s or more) with
what reproduces it; optionally all of it as JSON."""

from __future__ import annotations

import json
import resource
from collections import Counter
from pathlib import Path
from typing import Any

KINDS = ("error", "identical", "valid", "other")
LIMIT_S = 5.0


def rss_mib() -> float:
    """Peak resident memory of this process so far (MiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def table(cases: list[Any], memory: dict[str, float], valid: str, before: str, outside: bool = False) -> list[str]:
    """Markdown rows: one per mutator, then the total. valid: the header of the "valid" column;
    before: what the memory before the first case holds; outside: a column of files opened outside."""
    head = ["mutator", "cases", "clean error", "identical", valid, "other", *(["opens outside"] if outside else []),
            "max s/case"]  # fmt: skip
    rows = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    by: dict[str, list[Any]] = {}
    for c in cases:
        by.setdefault(c.mutator, []).append(c)
    for name, group in [*sorted(by.items()), ("**total**", cases)]:
        n = Counter(c.kind for c in group)
        cells = [name, str(len(group)), *(str(n[k]) for k in KINDS)]
        cells += [str(sum(len(c.outside) for c in group))] if outside else []
        rows.append("| " + " | ".join([*cells, f"{max(c.seconds for c in group):.3f}"]) + " |")
    rows.append(f"\npeak memory: {memory['peak_rss_mib']:.0f} MiB resident ({memory['rss_before_mib']:.0f} MiB "
                f"before the first case: {before})")  # fmt: skip
    return rows


def findings(cases: list[Any], memory: dict[str, float], seed: int, json_path: Path | None) -> int:
    """Print every finding (and write the counts and findings to json_path); returns the exit status
    (1 if any)."""
    bad = [c for c in cases if c.kind == "other" or c.seconds >= LIMIT_S]
    for c in bad:
        on = f" on {c.base}" if hasattr(c, "base") else ""
        print(f"FINDING {c.mutator}{on} ({c.seconds:.2f}s): {c.detail}")
    if json_path is not None:
        counts = {m: dict(Counter(c.kind for c in cases if c.mutator == m)) for m in sorted({c.mutator for c in cases})}
        found = [{"mutator": c.mutator, "base": getattr(c, "base", None), "seconds": c.seconds, "detail": c.detail}
                 for c in bad]  # fmt: skip
        json_path.write_text(json.dumps({"cases": len(cases), "seed": seed, "counts": counts, **memory,
                                         "max_seconds": max(c.seconds for c in cases), "findings": found},
                                        indent=1))  # fmt: skip
    return 1 if bad else 0
