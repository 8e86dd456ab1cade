#!/usr/bin/env bash
# Continue training built-in models from earlier weights (a tar holding tiny-latte/ and/or tiny-dit/).
# usage: bash scripts/continue_builtin.sh MODELS_TAR OUTDIR MINUTES SEED [tiny-latte] [tiny-dit]
set -euo pipefail
tarball=${1:?models.tar} out=${2:?outdir} minutes=${3:-8} seed=${4:-1}
shift 4 || true
models=("$@")
[ ${#models[@]} -gt 0 ] || models=(tiny-latte tiny-dit)
if compgen -G ".whl/*.whl" > /dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site:$PWD
fi
export PYTHONUNBUFFERED=1
mkdir -p /tmp/init && tar xf "$tarball" -C /tmp/init
common=(--device cuda --minutes "$minutes" --lr 2e-4 --warmup 200 --seed "$seed" --compile)
for m in "${models[@]}"; do
  if [ "$m" = tiny-latte ]; then extra=(--batch-size 128 --max-steps 7000); else extra=(--batch-size 256 --max-steps 12000); fi
  python3 -m qexport.models.train --model "$m" --init "/tmp/init/$m" --out "$out/$m" "${extra[@]}" "${common[@]}" > "$out/$m.log" 2>&1 &
done
wait
for m in "${models[@]}"; do
  tail -n 2 "$out/$m.log"
  if [ "$m" = tiny-latte ]; then args=(--seeds 0,1 --full); else args=(--seeds 0,1,2,3,4,5,6,7); fi
  python3 -m qexport.models.fp_eval --model "$m" --folder "$out/$m" --device cuda --batch-size 72 "${args[@]}" | tee -a "$out/eval.log"
done
(cd "$out" && tar cf models.tar "${models[@]}" && rm -rf "${models[@]}")
