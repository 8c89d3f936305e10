#!/usr/bin/env bash
# Everything that needs a GPU, in one go, from a fresh copy of the working tree:
#   build with nvcc for this GPU, the GPU tests (pytest -m gpu), compute-sanitizer on the kernel
#   tests, then benchmarks/bench_gpu.py. Log and JSON go into OUT_DIR.
#
#   benchmarks/gpu_check.sh OUT_DIR [--quick]
#
# Wheels the GPU machine lacks (gguf, llguidance) are installed from .whl/ when it exists
# (see benchmarks/README or the device notes); --quick skips torch and the F16 model in the benchmark.
set -uo pipefail
OUT=$(realpath -m "${1:?usage: benchmarks/gpu_check.sh OUT_DIR [--quick]}")
QUICK=${2:-}
mkdir -p "$OUT"
cd "$(dirname "$0")/.."
exec > >(tee "$OUT/gpu_check.log") 2>&1
export PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
failed=()
step() { echo; echo "=== $* ($(date +%T))"; }

step machine
nvidia-smi --query-gpu=name,memory.total,driver_version,compute_cap --format=csv || exit 1
echo "cores: $(nproc)"; $PY -V; nvcc --version | tail -1

if compgen -G ".whl/*.whl" > /dev/null; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/pe_site .whl/*.whl \
    || exit 1
  export PYTHONPATH=/tmp/pe_site${PYTHONPATH:+:$PYTHONPATH}
fi
# pyengine_convert is tools/convert (setup.py's package_dir): make it importable without installing.
mkdir -p /tmp/pe_path && ln -sfn "$PWD/tools/convert" /tmp/pe_path/pyengine_convert
export PYTHONPATH=$PWD:/tmp/pe_path:$PYTHONPATH

step build
CAP=$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader | head -1 | tr -d '. ')
export PYENGINE_CUDA=1 PYENGINE_CUDA_ARCHS=${PYENGINE_CUDA_ARCHS:-$CAP} CMAKE_BUILD_PARALLEL_LEVEL=$(nproc)
if ! $PY setup.py build_ext --inplace > "$OUT/build.log" 2>&1; then
  tail -60 "$OUT/build.log"; echo "BUILD FAILED"; exit 1
fi
grep -E "warning|CUDA backend" "$OUT/build.log" | head -20
$PY -c "from pyengine import _C; print('cuda devices:', _C.cuda_device_count(), _C.cuda_memory())" || exit 1

step "GPU tests"
timeout 300 $PY -m pytest -q -m gpu -p no:cacheprovider -rfE --junitxml="$OUT/gpu_tests.xml" \
  tests/gpu tests/test_offload.py tests/test_cuda_host_quant.py tests/test_cuda_host_attention.py \
  || failed+=("gpu tests")

step "compute-sanitizer (memcheck) on the kernel tests"
timeout 150 compute-sanitizer --tool memcheck --error-exitcode 3 --print-limit 20 \
  $PY -m pytest -q -x -p no:cacheprovider tests/gpu/test_gpu_attention.py tests/gpu/test_gpu_matmul.py \
  -k "not 4000 and not 300" 2>&1 | tail -40
rc=${PIPESTATUS[0]}; [ "$rc" = 0 ] || failed+=("compute-sanitizer rc=$rc")

step benchmark
args=(--out "$OUT/gpu_bench.json" --dir /tmp/pe_bench)
[ "$QUICK" = "--quick" ] && args+=(--types q4_0,q4_k --no-torch)
timeout 240 $PY benchmarks/bench_gpu.py "${args[@]}" || failed+=("benchmark")

step summary
if [ ${#failed[@]} -eq 0 ]; then echo "gpu_check: all passed"; else echo "gpu_check: FAILED: ${failed[*]}"; exit 1; fi
