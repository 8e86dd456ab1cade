"""Where a build's host memory goes: the build of a .qstats file with a sampler thread that reads
the process's resident memory (RSS) every few milliseconds and the innermost qexport function the
main thread is in. Prints the peak RSS over the model's FP32 weight bytes (the scale target is
<= 2.5), the peak of its anonymous part (RSS less mapped file pages, which the kernel can drop),
and, per function, the highest RSS seen while it ran.

    python bench/build_memory.py --stats dit.qstats --out /tmp/b --json mem.json
    python bench/build_memory.py --stats dit.qstats --out b --recipe w8a8-best --set gptq=on --device cuda --json m.json

One build per process (the peak is the process's own). Nothing is verified.
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import sys
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/census.py (the script runs with -P)
import census

PACKAGES = ("/qexport/", "/exporter/", "/passes/", "/calib/", "/targets/", "/verification/")


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def _anonymous() -> int:
    """Resident memory less its file-backed part (statm's resident - shared): what the kernel cannot
    drop, unlike the clean pages of a mapped file (the weights file the kept plans point into)."""
    with open("/proc/self/statm") as f:
        fields = f.read().split()
    return (int(fields[1]) - int(fields[2])) * resource.getpagesize()


def _where(frame: Any) -> str:
    """The innermost frame of the project's code: file:function."""
    while frame is not None:
        name = frame.f_code.co_filename
        if any(p in name for p in PACKAGES):
            return f"{Path(name).parent.name}/{Path(name).name}:{frame.f_code.co_name}"
        frame = frame.f_back
    return "(outside)"


class Sampler(threading.Thread):
    """RSS and the main thread's place, every `every` seconds, until stopped; each new timeline entry
    also appended to `log` if given (so a process the kernel kills for memory leaves its trace)."""

    def __init__(self, every: float, log: Path | None = None, census_step: float = 0.0) -> None:
        super().__init__(daemon=True)
        self.every = every
        self.log = log
        self.census_step = int(census_step * 2**30)  # a census each time RSS passes the last one's by this
        self.census_rss = _rss()
        self.censuses: list[dict[str, Any]] = []
        self.window = 0  # the peak since the last `window_peak()`
        self.main = threading.main_thread().ident
        self.peak: dict[str, int] = {}
        self.timeline: list[tuple[float, int, str]] = []
        self.anonymous = 0
        self.stop = threading.Event()

    def run(self) -> None:
        start = time.perf_counter()
        out = self.log.open("a", buffering=1) if self.log else None
        while not self.stop.wait(self.every):
            frame = sys._current_frames().get(self.main or 0)
            where = _where(frame)
            rss = _rss()
            self.anonymous = max(self.anonymous, _anonymous())
            self.window = max(self.window, rss)
            self.peak[where] = max(self.peak.get(where, 0), rss)
            if not self.timeline or self.timeline[-1][2] != where or rss > self.timeline[-1][1] * 1.05:
                self.timeline.append((round(time.perf_counter() - start, 2), rss, where))
                if out:
                    out.write(f"{self.timeline[-1][0]:.1f} s  {rss / 2**30:.2f} GiB  {where}\n")
            if self.census_step and rss > self.census_rss + self.census_step:
                self._census(rss, where, round(time.perf_counter() - start, 2), out)

    def _census(self, rss: int, where: str, at: float, out: Any) -> None:
        """Who holds the arrays now (bench/census.py); the main thread waits on the GIL meanwhile."""
        found = census.take()
        self.census_rss = rss
        self.censuses.append({"seconds": at, "rss": rss, "where": where, **found})
        if out:
            gib = 2**30
            out.write(f"census at {at:.1f} s, RSS {rss / gib:.2f} GiB in {where}: numpy "
                      f"{found['numpy_anonymous'] / gib:.2f} GiB (+{found['numpy_mapped'] / gib:.2f} mapped), "
                      f"CPU tensors {found['torch_cpu'] / gib:.2f} GiB, ONNX messages and bytes "
                      f"{found['messages_and_bytes'] / gib:.2f} GiB\n")  # fmt: skip

    def window_peak(self) -> int:
        """The peak RSS since the last call (or the start); a new window begins."""
        peak, self.window = max(self.window, _rss()), 0
        return peak


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--stats", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--recipe", default="w8a8-tsq-tsw")
    parser.add_argument("--set", action="append", default=[], help="a recipe setting (key=value), repeatable")
    parser.add_argument("--every", type=float, default=0.02, help="seconds between samples")
    parser.add_argument("--device", default="cpu", help="build --device: where the replay and GPTQ run")
    parser.add_argument("--json", type=Path, required=True)
    parser.add_argument(
        "--census",
        type=float,
        default=0.0,
        metavar="GIB",
        help="a census of who holds the arrays (bench/census.py) each time RSS passes the last by GIB",
    )
    parser.add_argument("--log", type=Path, help="append each timeline entry here as it is sampled (kept if stopped)")
    a = parser.parse_args()

    from qexport.exporter.build import BuildConfig, build

    from qexport.recipe import load_recipe, with_settings

    recipe = with_settings(load_recipe(a.recipe), a.set)
    base = _rss()
    sampler = Sampler(a.every, a.log, a.census)
    sampler.start()
    start = time.perf_counter()
    built = build(a.stats, a.out, BuildConfig(recipe=recipe, force=True, device=a.device))
    seconds = time.perf_counter() - start
    sampler.stop.set()
    sampler.join()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    fp32 = sum(p.numel() * 4 for p in built.adapter.transformer.parameters())
    result = {
        "model": built.adapter.model_id,
        "recipe": a.recipe,
        "settings": a.set,
        "models": len(built.ranges),
        "seconds": round(seconds, 1),
        "fp32_weight_bytes": fp32,
        "rss_before_build": base,
        "peak_rss": peak,
        "peak_over_fp32": round(peak / fp32, 2),
        "peak_anonymous": sampler.anonymous,
        "peak_anonymous_over_fp32": round(sampler.anonymous / fp32, 2),
        "peak_by_function": dict(sorted(sampler.peak.items(), key=lambda kv: -kv[1])),
        "timeline": sampler.timeline,
        "censuses": sampler.censuses,
    }
    a.json.write_text(json.dumps(result, indent=1))
    shutil.rmtree(a.out, ignore_errors=True)
    gib = 2**30
    print(f"{result['model']}: {len(built.ranges)} models in {seconds:.0f} s; FP32 weights {fp32 / gib:.2f} GiB, "
          f"RSS before the build {base / gib:.2f} GiB, peak {peak / gib:.2f} GiB = "
          f"{peak / fp32:.2f}x the FP32 weights; anonymous (not file-backed) peak {sampler.anonymous / gib:.2f} GiB = "
          f"{sampler.anonymous / fp32:.2f}x")  # fmt: skip
    print("highest RSS while in (top 12):")
    for where, rss in list(result["peak_by_function"].items())[:12]:
        print(f"  {rss / gib:6.2f} GiB  {where}")
    if sampler.censuses:
        last = sampler.censuses[-1]
        print(f"census at the highest RSS taken ({last['rss'] / gib:.2f} GiB, {last['seconds']} s, {last['where']}): "
              f"numpy {last['numpy_anonymous'] / gib:.2f} GiB (+{last['numpy_mapped'] / gib:.2f} GiB mapped files), "
              f"CPU tensors {last['torch_cpu'] / gib:.2f} GiB, ONNX messages and bytes "
              f"{last['messages_and_bytes'] / gib:.2f} GiB; the rest is native or Python objects")  # fmt: skip
        for kind in ("anonymous_by_holder", "torch_by_holder", "messages_and_bytes_by_holder", "mapped_by_holder"):
            print(f"  {kind.replace('_', ' ')}:")
            for holder, size in last[kind][:10]:
                print(f"    {size / gib:6.2f} GiB  {holder}")


if __name__ == "__main__":
    main()
