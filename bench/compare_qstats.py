"""Compare two .qstats files field by field (e.g. single-GPU vs torchrun multi-GPU calibration).

    python bench/compare_qstats.py one.qstats two.qstats [--json compare.json] [--rtol 1e-9]

Extremes, counts and histograms must be bit-exact; the float64 sums and running averages may
differ by summation order only (relative difference <= --rtol). Exit status 1 if they differ.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import numpy as np
from qexport.calib.store import load

EXACT = ("minimum", "maximum", "channel_min", "channel_max", "count", "asq_n", "hist", "hist_range")
CLOSE = ("absmax_sum", "asq_z")
HEADER = ("model_id", "config_hash", "steps", "timesteps", "cfg", "prompts_hash", "seeds", "samples", "autocast")


def compare(a_path: Path, b_path: Path, rtol: float) -> dict[str, Any]:
    """Per-field verdicts over all layers: bit-exact or the largest relative difference."""
    a, b = load(a_path), load(b_path)
    header = {k: a.header.get(k) == b.header.get(k) for k in HEADER}
    fields: dict[str, dict[str, Any]] = {}
    same_layers = list(a.layers) == list(b.layers)
    for f in (*EXACT, *CLOSE):
        differing, worst = 0, 0.0
        for name in a.layers if same_layers else []:
            x, y = getattr(a.layers[name], f), getattr(b.layers[name], f)
            if x is None or y is None:
                differing += int((x is None) != (y is None))
                continue
            x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
            if not np.array_equal(x, y):
                differing += 1
                scale = np.maximum(np.abs(x), np.abs(y))
                worst = max(worst, float(np.max(np.abs(x - y) / np.where(scale > 0, scale, 1))))
        ok = differing == 0 if f in EXACT else worst <= rtol
        fields[f] = {"layers_differing": differing, "max_rel_diff": worst, "ok": ok}
    ok = same_layers and all(header.values()) and all(v["ok"] for v in fields.values())
    return {"a": str(a_path), "b": str(b_path), "layers": len(a.layers), "same_layers": same_layers,
            "header_equal": header, "fields": fields, "rtol": rtol, "equal": ok}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("a", type=Path)
    parser.add_argument("b", type=Path)
    parser.add_argument("--rtol", type=float, default=1e-9)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    result = compare(args.a, args.b, args.rtol)
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))
    print(f"{args.a} vs {args.b}: {result['layers']} layers, header equal: "
          f"{all(result['header_equal'].values())} {result['header_equal']}")  # fmt: skip
    for f, v in result["fields"].items():
        kind = "bit-exact" if f in EXACT else f"rel <= {args.rtol:g}"
        print(f"  {f:<12} {kind:<14} layers differing {v['layers_differing']:>4}, max rel diff "
              f"{v['max_rel_diff']:.3g}  {'ok' if v['ok'] else 'DIFFERENT'}")  # fmt: skip
    print("equal" if result["equal"] else "NOT equal")
    raise SystemExit(0 if result["equal"] else 1)


if __name__ == "__main__":
    main()
