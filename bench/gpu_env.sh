# Source on a lent GPU machine (no network): install the carried wheels (.whl/: diffusers,
# importlib_metadata, onnx-graphsurgeon, pydantic, threadpoolctl) and this checkout into /tmp/site, then use it.
#   source bench/gpu_env.sh
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl &&
  python3 -m pip install -q --no-index --no-deps --no-build-isolation --no-compile --target /tmp/site . &&
  export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
