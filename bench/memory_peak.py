"""What host memory holds at a build's peak, by where it was allocated: one build of
bench/best_build.py (in this process) under memray, then its high-water mark summed by the first
qexport frames of each allocation's stack. memray is not a dependency: `pip install memray`.

    python bench/memory_peak.py capture peak.bin --stats dit.qstats --device cuda --recipe w8a8-best,gptq=on
    python bench/memory_peak.py report peak.bin --top 25

Only allocations that malloc sees are counted (numpy, torch's CPU tensors, Python objects), not
memory mapped from files; the peak RSS that best_build.py reports is the figure to compare builds by.
"""

from __future__ import annotations

import argparse
import collections
import runpy
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent


def capture(out: Path, stats: Path, device: str, recipe: str) -> None:
    import memray

    work = Path(tempfile.mkdtemp(prefix="qexport-peak-"))
    sys.argv = [str(HERE / "best_build.py"), "--stats", str(stats), "--device", device, "--json", str(work / "b.json"),
                "--child", str(work / "build"), recipe]  # fmt: skip
    out.unlink(missing_ok=True)
    with memray.Tracker(out, file_format=memray.FileFormat.AGGREGATED_ALLOCATIONS):
        runpy.run_path(sys.argv[0], run_name="__main__")


def _where(stack: list[tuple[str, str, int]], frames: int) -> str:
    """The first `frames` frames of the repository's own code, innermost first (else the innermost)."""
    ours = [
        f"{Path(file).name}:{line} {function}"
        for function, file, line in stack
        if str(HERE.parent) in file and "site-packages" not in file
    ]
    return " < ".join(ours[:frames]) if ours else (f"{stack[0][0]} ({Path(stack[0][1]).name})" if stack else "?")


def report(capture_file: Path, top: int, frames: int) -> None:
    from memray import FileReader

    reader = FileReader(capture_file)
    sizes: collections.Counter[str] = collections.Counter()
    for record in reader.get_high_watermark_allocation_records(merge_threads=True):
        sizes[_where(record.stack_trace(max_stacks=60), frames)] += record.size
    total = sum(sizes.values())
    print(f"{capture_file.name}: {total / 2**30:.2f} GiB allocated at the peak")
    for where, size in sizes.most_common(top):
        print(f"{size / 2**30:8.2f} GiB  {100 * size / total:5.1f} %  {where}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    c = sub.add_parser("capture", help="one build under memray")
    c.add_argument("out", type=Path)
    c.add_argument("--stats", type=Path, required=True)
    c.add_argument("--device", default="cpu")
    c.add_argument("--recipe", default="w8a8-best,gptq=on", help="RECIPE[,KEY=VALUE...] as best_build.py takes it")
    r = sub.add_parser("report", help="the peak by allocating code")
    r.add_argument("capture", type=Path)
    r.add_argument("--top", type=int, default=25)
    r.add_argument("--frames", type=int, default=3)
    a = parser.parse_args()
    if a.command == "capture":
        capture(a.out, a.stats, a.device, a.recipe)
    else:
        report(a.capture, a.top, a.frames)


if __name__ == "__main__":
    main()
