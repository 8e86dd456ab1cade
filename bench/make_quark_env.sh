#!/usr/bin/env bash
# AMD Quark's own interpreter for bench/accuracy_peers.py: amd-quark 0.13 pins onnx <= 1.22, and
# qexport needs onnx 1.23, so Quark cannot live in qexport's environment. This venv holds Quark
# with onnx 1.22 / onnxruntime 1.28 and reads torch (CPU) from the qexport environment through a
# .pth file placed after its own site-packages (installing torch here from the index would pull
# CUDA wheels).
#   bash bench/make_quark_env.sh [PYTHON]   # PYTHON: qexport's interpreter (default: python)
set -euo pipefail
python=${1:-python}
root=$(cd "$(dirname "$0")/.." && pwd)
base=$("$python" -c 'import sysconfig, torch; print(sysconfig.get_paths()["purelib"])')
"$python" -m venv "$root/.venv-quark"
site=$("$root/.venv-quark/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
echo "$base" > "$site/zz_qexport_env.pth"
# and the environment that environment reads from, if it is itself layered (a .pth naming it)
grep -hE "^/" "$base"/*.pth >> "$site/zz_qexport_env.pth" 2>/dev/null || true
"$root/.venv-quark/bin/pip" install -q "amd-quark==0.13" "onnxruntime==1.28.0"
"$root/.venv-quark/bin/python" -c "import quark.onnx, onnx, onnxruntime; print('quark env ok: onnx', onnx.__version__, 'onnxruntime', onnxruntime.__version__)"
