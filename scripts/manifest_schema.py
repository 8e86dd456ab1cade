"""Write docs/manifest.schema.json, the JSON Schema of manifest.json, from its pydantic model
(qexport.runtime.manifest_schema.Manifest); --check only compares (exit 1 when it differs).

    python scripts/manifest_schema.py [--check]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from qexport.runtime.manifest_schema import Manifest

OUT = Path(__file__).resolve().parents[1] / "docs" / "manifest.schema.json"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="compare with the committed file, write nothing")
    args = parser.parse_args(argv)
    text = json.dumps(Manifest.model_json_schema(by_alias=True, mode="validation"), indent=2, sort_keys=True) + "\n"
    if args.check:
        same = OUT.is_file() and OUT.read_text() == text
        print(f"{OUT} {'matches' if same else 'differs from'} the schema; run python scripts/manifest_schema.py")
        return 0 if same else 1
    OUT.write_text(text)
    print(f"wrote {OUT}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
