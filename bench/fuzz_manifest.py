"""Fuzz the build folder as the edge loop reads it: N mutated copies of a real tiny-dit build
(tests/manifest_mutations.py's mutators: manifest bytes, fields, paths, symlinks, files, model
external-data locations; unsealed or resealed), each read and, where it reads as changed, run once.

    python bench/fuzz_manifest.py --cases 2000 --seed 0 [--json fuzz.json]
    strace -f -qq -e trace=openat,open,faccessat,faccessat2,access -o trace.txt \
        python bench/fuzz_manifest.py --cases 400 --seed 7 --marks
    python bench/fuzz_manifest.py --check-trace trace.txt

Prints one row per mutator and a total: clean errors (one QexportError line), reads identical to
the original, resealed builds that read and run, anything else (a finding: its mutator and seed are
printed to reproduce it), the slowest case, the peak memory, and the files opened outside the
build folder (Python's opens and the models handed to onnxruntime). Exit status 1 if any case is
"other" or takes 5 s or more. With --marks each case's read-and-run phase is marked in the system
calls (os.access of a marker path), so an strace of the run shows what onnxruntime and the other
native libraries opened too; --check-trace lists the opens of those phases outside the case's folder.
"""

from __future__ import annotations

import argparse
import os
import random
import re
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # the mutators live beside their tests

import manifest_mutations
from fuzz_report import findings, rss_mib, table
from manifest_mutations import MUTATORS, Case, Opens, make_build, run_build, run_case

from qexport.runtime.manifest import read_manifest

MARK = "/nonexistent/qexport-fuzz-case"  # os.access(MARK + ":begin:" + folder) and (MARK + ":end")
SYSTEM = ("/proc/", "/sys/", "/dev/", "/etc/hosts", "/etc/localtime", "/etc/ld.so", "/lib", "/usr/lib")


def mark_cases() -> None:
    """Mark each case's read-and-run phase in the system calls (an access() of a marker path)."""
    outcome = manifest_mutations.outcome

    def marked(folder: Path, *args: object, **kwargs: object) -> tuple[str, str]:
        os.access(f"{MARK}:begin:{folder}", os.F_OK)
        try:
            return outcome(folder, *args, **kwargs)  # type: ignore[arg-type]
        finally:
            os.access(f"{MARK}:end", os.F_OK)

    manifest_mutations.outcome = marked


def check_trace(path: Path) -> tuple[int, int, list[str]]:
    """(cases, files opened or tried in their read-and-run phases, those outside the case's folder) of an
    strace log of a --marks run; Python's own files, the repository's and the system's not counted."""
    allowed = (sys.prefix, sys.base_prefix, str(Path(__file__).resolve().parents[1]), *SYSTEM)
    folder, cases, opened, outside = None, 0, 0, []
    for line in path.read_text().splitlines():
        found = re.search(r'(?:open|openat|access|faccessat2?)\((?:AT_FDCWD, )?"([^"]*)"', line)
        if not found:
            continue
        name = found.group(1)
        if name.startswith(f"{MARK}:begin:"):
            folder, cases = name.removeprefix(f"{MARK}:begin:"), cases + 1
        elif name.startswith(f"{MARK}:end"):
            folder = None
        elif folder is not None and "open" in line.split("(")[0]:
            opened += 1
            real = os.path.normpath(name)
            if not (real == folder or real.startswith((folder + "/", *allowed))):
                outside.append(line.strip())
    return cases, opened, outside


def fuzz(cases: int, seed: int) -> tuple[list[Case], dict[str, float]]:
    """Run `cases` mutations drawn from `seed`; returns every case and the memory figures (MiB)."""
    master = random.Random(seed)
    names = sorted(MUTATORS)
    out: list[Case] = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        base = make_build(root)
        original, latents, opens = read_manifest(base), run_build(base), Opens()
        before = rss_mib()
        for _ in range(cases):
            mutator, case_seed = master.choice(names), master.getrandbits(32)
            case = run_case(root, base, original, latents, mutator, random.Random(case_seed), opens)
            case.detail = f"seed {case_seed}: {case.detail}" if case.kind == "other" else ""
            out.append(case)
    return out, {"rss_before_mib": before, "peak_rss_mib": rss_mib()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, help="also write the counts and findings here")
    parser.add_argument("--marks", action="store_true", help="mark each case's phase for an strace of the run")
    parser.add_argument("--check-trace", type=Path, help="only list the opens outside the folder in this strace log")
    args = parser.parse_args(argv)
    if args.check_trace:
        cases, opened, outside = check_trace(args.check_trace)
        print(f"{cases} cases: {opened} files opened while reading and running, {len(outside)} outside the folder")
        print("\n".join(outside[:20]))
        return 1 if outside else 0
    if args.marks:
        mark_cases()
    cases, memory = fuzz(args.cases, args.seed)
    before = "Python, numpy, onnxruntime, and torch for making the base build"
    print("\n".join(table(cases, memory, "valid (resealed, runs)", before, outside=True)))
    return findings(cases, memory, args.seed, args.json)


if __name__ == "__main__":
    sys.exit(main())
