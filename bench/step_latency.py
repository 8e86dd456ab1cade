"""Per-step latency of the built-in FP denoisers (batch 2 = cond + uncond) on this CPU.

    python bench/step_latency.py [--threads 2] [--repeats 20]

Prints each model's median step time beside the 1 s budget the demo path relies on.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from qexport.models.registry import load_model


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"{'model':<12}{'params':>10}{'median ms':>12}{'p90 ms':>10}{'share of 1 s':>14}")
    for name in ("tiny-latte", "tiny-dit"):
        adapter = load_model(name)
        denoiser = adapter.denoiser()
        x, t, cond = adapter.example_inputs(batch=2)
        x = torch.randn_like(x)
        times = []
        with torch.no_grad():
            for i in range(args.repeats + 3):
                start = time.perf_counter()
                denoiser(x, t, cond)
                if i >= 3:
                    times.append(time.perf_counter() - start)
        med = statistics.median(times)
        p90 = sorted(times)[int(0.9 * (len(times) - 1))]
        print(f"{name:<12}{adapter.num_parameters / 1e6:>9.2f}M{med * 1e3:>12.1f}{p90 * 1e3:>10.1f}{med:>14.2f}")


if __name__ == "__main__":
    main()
