#!/usr/bin/env bash
# Train both built-in models on one GPU (through the device tool) and judge their FP samples.
# usage: bash scripts/train_builtin.sh OUTDIR MINUTES    (wheels for missing packages in .whl/)
set -euo pipefail
out=${1:?outdir} minutes=${2:-6.5}
if compgen -G ".whl/*.whl" > /dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site:$PWD
fi
export PYTHONUNBUFFERED=1
nvidia-smi -L || true
python3 -m qexport.models.train --model tiny-latte --out "$out/tiny-latte" --device cuda --minutes "$minutes" --batch-size 128 > "$out/latte.log" 2>&1 &
python3 -m qexport.models.train --model tiny-dit --out "$out/tiny-dit" --device cuda --minutes "$minutes" --batch-size 256 > "$out/dit.log" 2>&1 &
wait
tail -n 3 "$out/latte.log" "$out/dit.log"
python3 -m qexport.models.fp_eval --model tiny-latte --folder "$out/tiny-latte" --device cuda --seeds 0,1 --full --batch-size 72 | tee -a "$out/eval.log"
python3 -m qexport.models.fp_eval --model tiny-dit --folder "$out/tiny-dit" --device cuda --seeds 0,1,2,3,4,5,6,7 --batch-size 72 | tee -a "$out/eval.log"
python3 -m qexport.models.fp_eval --model tiny-latte --folder "$out/tiny-latte" --device cuda --seeds 0,1 --full --batch-size 72 --cfg 4.0 | tee -a "$out/eval.log"
(cd "$out" && tar cf models.tar tiny-latte tiny-dit && rm -rf tiny-latte tiny-dit)
