#!/usr/bin/env bash
# The best recipe's measurements on the GPU machine, each a part of its own, logs and JSON in OUTDIR.
# Run from the repository root after `source bench/gpu_env.sh`:
#   bash bench/gpu_best_recipe.sh OUTDIR builds     # latte-1 and dit-xl-2 calibrated on the GPU, then side by side:
#                                                   #   cores 0-9: latte-1's best + GPTQ build on the GPU;
#                                                   #   cores 10-15: latte-1's plain build (CPU only), then dit-xl-2's
#                                                   #   best + GPTQ (GPU) and plain (CPU) builds with host memory by function
#   bash bench/gpu_best_recipe.sh OUTDIR latte      # latte-1 alone: calibrated on the GPU, then its best + GPTQ build (GPU,
#                                                   #   cores 0-9) beside its plain build (CPU only, cores 10-15); the GPU
#                                                   #   not shared; both with host memory by function, timeline kept
#   bash bench/gpu_best_recipe.sh OUTDIR memory     # both models, the GPU never shared: cores 0-9, dit-xl-2's best + GPTQ
#                                                   #   build (GPU), then latte-1's; cores 10-15, their plain builds (CPU
#                                                   #   only); every build with host memory by function, timeline kept
#   bash bench/gpu_best_recipe.sh OUTDIR dit        # dit-xl-2 alone: calibrated on the GPU, then its best + GPTQ build (GPU,
#                                                   #   cores 0-9) with host memory by function, timeline kept
#   bash bench/gpu_best_recipe.sh OUTDIR profile    # latte-1's best + GPTQ build (GPU, cores 0-9) alone, every thread's
#                                                   #   Python stacks sampled by py-spy (pip install py-spy; on PATH), 20
#                                                   #   a second, idle ones too, for PROFILE_SECONDS (default 1500)
#   bash bench/gpu_best_recipe.sh OUTDIR allocator  # dit-xl-2's best + GPTQ build (GPU, cores 10-15) with host memory by
#                                                   #   function under glibc's defaults, MALLOC_ARENA_MAX=2 and
#                                                   #   MALLOC_MMAP_THRESHOLD_=4194304, one after another
#   bash bench/gpu_best_recipe.sh OUTDIR census     # dit-xl-2's best + GPTQ build (GPU, cores 0-9) beside its plain build
#                                                   #   (CPU only, cores 10-15) then its best build with MALLOC_ARENA_MAX=2
#                                                   #   (GPU, cores 10-15), each with a census of who holds the arrays
#                                                   #   (bench/census.py) each time its RSS rises 0.25 GiB
#   bash bench/gpu_best_recipe.sh OUTDIR speed      # dit-b-2 step latency at 2 and 8 threads, cores 0-7 (CPU only)
# Each build runs in its own process: its peak host memory is its own.
set -uo pipefail
out=$(realpath -m "${1:?outdir}") part=${2:?builds, latte, dit, memory, profile, allocator, census or speed} root=$PWD
mkdir -p "$out"
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1
work=$(mktemp -d)
cd "$work" || exit 1  # not the checkout: `-m qexport` must import the installed package
stamp() { while IFS= read -r line; do printf '%(%H:%M:%S)T %s\n' -1 "$line"; done; }
python3 -c "import qexport.models.shapes as s; print('\n'.join(s.eval_prompts()[::3]))" > calib8.txt
calibrate_latte() {  # latte-1 on the 8 captions, 20 steps, on the GPU
  taskset -c 0-15 python3 -m qexport calibrate --model latte-1 --prompts calib8.txt --steps 20 --batch-size 4 \
    --device cuda -o latte.qstats
}
calibrate_dit() {  # dit-xl-2 on 8 labels, 20 steps, on the GPU (cores: $1)
  taskset -c "$1" python3 -m qexport calibrate --model dit-xl-2 --labels 1,2,3,4,5,6,7,8 --batch-size 8 --steps 20 \
    --device cuda -o dit.qstats
}
latte_best() {  # latte-1's best + GPTQ build on the GPU, cores 0-9
  OMP_NUM_THREADS=10 taskset -c 0-9 python3 -P "$root/bench/best_build.py" --stats latte.qstats --device cuda \
    --work "$work/b" --builds best+gptq=w8a8-best,gptq=on --json "$out/latte_best.json"
}
latte_plain() {  # latte-1's plain build, CPU only, cores 10-15
  OMP_NUM_THREADS=6 taskset -c 10-15 python3 -P "$root/bench/best_build.py" --stats latte.qstats --device cpu \
    --work "$work/p" --builds plain=w8a8-tsq-tsw --json "$out/latte_plain.json"
}
build_memory() {  # a build with host memory by function: model, cores, JSON name, then build_memory.py's options
  local model=$1 cores=$2 name=$3; shift 3
  OMP_NUM_THREADS=$(( ${cores#*-} - ${cores%-*} + 1 )) taskset -c "$cores" python3 -P "$root/bench/build_memory.py" \
    --stats "$model.qstats" --out "$work/m_${model}_$name" --every 0.2 --json "$out/${model}_memory_$name.json" "$@"
}
dit_memory() { build_memory dit "$@"; }
best_memory() {  # a model's best + GPTQ build on the GPU, cores 0-9, its timeline kept
  build_memory "$1" 0-9 best --recipe w8a8-best --set gptq=on --device cuda --log "$out/$1_best_timeline.log"
}
plain_memory() {  # a model's plain build, CPU only, cores 10-15, its timeline kept
  build_memory "$1" 10-15 plain --recipe w8a8-tsq-tsw --log "$out/$1_plain_timeline.log"
}
case $part in
  builds)
    { calibrate_latte && calibrate_dit 0-15; } 2>&1 | stamp > "$out/calibrate.log" || exit 1
    latte_best 2>&1 | stamp > "$out/latte_best.log" &
    { latte_plain
      dit_memory 10-15 best --recipe w8a8-best --set gptq=on --device cuda
      dit_memory 10-15 plain --recipe w8a8-tsq-tsw; } 2>&1 | stamp > "$out/lane2.log" &
    wait ;;
  latte)
    calibrate_latte 2>&1 | stamp > "$out/calibrate.log" || exit 1
    best_memory latte 2>&1 | stamp > "$out/latte_best.log" &
    plain_memory latte 2>&1 | stamp > "$out/latte_plain.log" &
    wait ;;
  memory)
    { calibrate_dit 0-15 && calibrate_latte; } 2>&1 | stamp > "$out/calibrate.log" || exit 1
    { best_memory dit; best_memory latte; } 2>&1 | grep --line-buffered -v "building models" | stamp > "$out/lane1.log" &
    { plain_memory dit; plain_memory latte; } 2>&1 | grep --line-buffered -v "building models" | stamp > "$out/lane2.log" &
    wait ;;
  dit)
    calibrate_dit 0-15 2>&1 | stamp > "$out/calibrate.log" || exit 1
    best_memory dit 2>&1 | grep --line-buffered -v "building models" | stamp > "$out/dit_best.log" ;;
  profile)  # latte-1's best build with every thread's stacks sampled by py-spy (on PATH) for PROFILE_SECONDS
    calibrate_latte 2>&1 | stamp > "$out/calibrate.log" || exit 1
    best_memory latte 2>&1 | grep --line-buffered -v "building models" | stamp > "$out/latte_best.log" &
    until pid=$(pgrep -n -f "build_memory.py --stats latte.qstats"); do sleep 1; done  # the build's process
    py-spy record --pid "$pid" --threads --idle --rate 20 \
      --format raw -o "$out/latte_best_profile.txt" --duration "${PROFILE_SECONDS:-1500}" > "$out/py-spy.log" 2>&1
    wait ;;
  allocator)
    calibrate_dit 10-15 > "$out/calibrate_dit.log" 2>&1 || exit 1
    for setting in defaults MALLOC_ARENA_MAX=2 MALLOC_MMAP_THRESHOLD_=4194304; do
      ( [ "$setting" = defaults ] || export "${setting?}"  # the allocator setting for this build's process only
        dit_memory 10-15 "${setting%%=*}" --recipe w8a8-best --set gptq=on --device cuda ) 2>&1 |
        grep --line-buffered -v "building models" | stamp > "$out/allocator_${setting%%=*}.log"
    done ;;
  census)
    calibrate_dit 0-15 > "$out/calibrate_dit.log" 2>&1 || exit 1
    dit_memory 0-9 best --recipe w8a8-best --set gptq=on --device cuda --census 0.25 \
      --log "$out/dit_best_timeline.log" 2>&1 | grep --line-buffered -v "building models" | stamp > "$out/lane1.log" &
    { dit_memory 10-15 plain --recipe w8a8-tsq-tsw --census 0.25 --log "$out/dit_plain_timeline.log"
      [ -n "${CENSUS_ONLY:-}" ] || ( export MALLOC_ARENA_MAX=2  # glibc's arenas limited, this build's process only
        dit_memory 10-15 arenas2 --recipe w8a8-best --set gptq=on --device cuda --census 0.25 \
          --log "$out/dit_arenas2_timeline.log" ); } 2>&1 | grep --line-buffered -v "building models" | stamp > "$out/lane2.log" &
    wait ;;
  speed)
    taskset -c 0-7 python3 "$root/bench/speed.py" --models dit-b-2 --bits 8 --repeats 10 --threads 2,8 \
      --work "$work/s" > "$out/speed.log" 2>&1 ;;
  *) echo "unknown part $part: builds, latte, dit, memory, profile, allocator, census or speed" >&2; exit 2 ;;
esac
grep -h -v "building models\|evaluating" "$out"/*.log | tail -20
