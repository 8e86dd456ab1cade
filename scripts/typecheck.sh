#!/usr/bin/env bash
# mypy over the qexport namespace: the design card's root folders (exporter/, calib/, passes/,
# targets/, verification/) are mapped into qexport.* by pyproject's package-dir, which mypy
# cannot read, so we type-check a tree of symlinks laid out as the installed package.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
tree=$(mktemp -d)
trap 'rm -rf "$tree"' EXIT
mkdir -p "$tree/qexport"
for entry in "$root"/qexport/*; do ln -s "$entry" "$tree/qexport/"; done
for pkg in exporter calib passes targets verification; do ln -s "$root/$pkg" "$tree/qexport/$pkg"; done
cd "$root"
python -m mypy --config-file "$root/pyproject.toml" "$tree/qexport"
