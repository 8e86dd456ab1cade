#!/usr/bin/env bash
# Continue training both built-in models from earlier weights (a tar of tiny-latte/ and tiny-dit/).
# usage: bash scripts/continue_builtin.sh MODELS_TAR OUTDIR MINUTES SEED
set -euo pipefail
tarball=${1:?models.tar} out=${2:?outdir} minutes=${3:-8} seed=${4:-1}
if compgen -G ".whl/*.whl" > /dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site:$PWD
fi
export PYTHONUNBUFFERED=1
mkdir -p /tmp/init && tar xf "$tarball" -C /tmp/init
common=(--device cuda --minutes "$minutes" --lr 3e-4 --warmup 100 --seed "$seed")
python3 -m qexport.models.train --model tiny-latte --init /tmp/init/tiny-latte --out "$out/tiny-latte" --batch-size 128 --max-steps 5000 "${common[@]}" > "$out/latte.log" 2>&1 &
python3 -m qexport.models.train --model tiny-dit --init /tmp/init/tiny-dit --out "$out/tiny-dit" --batch-size 256 --max-steps 12000 "${common[@]}" > "$out/dit.log" 2>&1 &
wait
tail -n 2 "$out/latte.log" "$out/dit.log"
python3 -m qexport.models.fp_eval --model tiny-latte --folder "$out/tiny-latte" --device cuda --seeds 0,1 --full --batch-size 72 | tee -a "$out/eval.log"
python3 -m qexport.models.fp_eval --model tiny-dit --folder "$out/tiny-dit" --device cuda --seeds 0,1,2,3,4,5,6,7 --batch-size 72 | tee -a "$out/eval.log"
(cd "$out" && tar cf models.tar tiny-latte tiny-dit && rm -rf tiny-latte tiny-dit)
