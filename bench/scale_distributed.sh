#!/usr/bin/env bash
# Single-GPU vs torchrun 2-GPU (NCCL) calibration of the same prompts, then a field-by-field
# comparison of the two .qstats files. Run from the repository root on a 2-GPU machine, with
# qexport importable (source bench/gpu_env.sh). usage: bash bench/scale_distributed.sh OUTDIR
set -uo pipefail
out=${1:?outdir} root=$PWD
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
work=$(mktemp -d)
cd "$work" || exit 1  # not the checkout: `-m qexport` must import the installed package
run() {  # name, model, prompts flag, prompts, batch
  local name=$1 model=$2 flag=$3 prompts=$4 batch=$5
  local args=(calibrate --model "$model" "$flag" "$prompts" --batch-size "$batch" --steps 20 --device cuda)
  CUDA_VISIBLE_DEVICES=0 timeout 150 python3 -m qexport "${args[@]}" -o "$name-1gpu.qstats" > "$out/$name-1gpu.log" 2>&1
  timeout 150 torchrun --nproc-per-node 2 -m qexport "${args[@]}" -o "$name-2gpu.qstats" > "$out/$name-2gpu.log" 2>&1
  grep -h "^wrote" "$out/$name-1gpu.log" "$out/$name-2gpu.log"
  python3 "$root/bench/compare_qstats.py" "$name-1gpu.qstats" "$name-2gpu.qstats" --json "$out/$name-compare.json"
}
nvidia-smi -L
run dit-xl-2 dit-xl-2 --labels "$(seq -s, 0 63)" 16
captions=$(mktemp); for i in $(seq 0 15); do echo "a scene number $i"; done > "$captions"
run latte-1 latte-1 --prompts "$captions" 4
