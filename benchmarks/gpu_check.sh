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
env | grep -E "^(CC|CXX|CUDAHOSTCXX|CFLAGS|CXXFLAGS|LDFLAGS)=" || true

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
$PY -c "import pybind11; print('pybind11', pybind11.__version__)"
build() {
  if ! $PY setup.py build_ext --inplace > "$OUT/build.log" 2>&1; then
    tail -60 "$OUT/build.log"; echo "BUILD FAILED"; exit 1
  fi
  grep -E "warning|CUDA backend|compiler identification" "$OUT/build.log" | head -20
}
# A C++ exception must reach Python as an exception (a module built against another C++ runtime
# than the one loaded can crash instead): check that before anything else.
throws_cleanly() {
  $PY -c "
from pyengine import _C
try:
    _C.dequantize(bytes(18), 2, 1, 48)  # a message with numbers in it
except Exception as e:
    print('C++ exceptions reach Python:', e)"
}
build
if ! throws_cleanly; then
  ldd pyengine/_C*.so
  echo "C++ exceptions crash with this toolchain; $(ls /usr/bin/g++* 2>/dev/null | tr '\n' ' ')"
  ldd pyengine/_C*.so | grep -E "stdc|gcc_s"
  if [ -x /usr/bin/g++ ]; then
    echo "rebuilding with /usr/bin/g++"; rm -rf build
    export CC=/usr/bin/gcc CXX=/usr/bin/g++ CUDAHOSTCXX=/usr/bin/g++
    build; throws_cleanly || { echo "still crashing"; exit 1; }
  else
    exit 1
  fi
fi
$PY -c "from pyengine import _C; print('cuda devices:', _C.cuda_device_count(), _C.cuda_memory())" || exit 1

step "GPU tests"
timeout ${PE_TEST_TIMEOUT:-300} $PY -m pytest -q -m gpu -p no:cacheprovider -rfE --junitxml="$OUT/gpu_tests.xml" \
  tests/gpu tests/test_offload.py tests/test_cuda_host_quant.py tests/test_cuda_host_attention.py \
  || failed+=("gpu tests")

step "compute-sanitizer (memcheck) on the kernel tests"
timeout ${PE_SAN_TIMEOUT:-150} compute-sanitizer --tool memcheck --error-exitcode 3 --print-limit 20 \
  $PY -m pytest -q -x -p no:cacheprovider tests/gpu/test_gpu_attention.py tests/gpu/test_gpu_matmul.py \
  tests/gpu/test_gpu_top_logits.py -k "not 4000 and not 300 and not 151936" 2>&1 | tail -40
rc=${PIPESTATUS[0]}; [ "$rc" = 0 ] || failed+=("compute-sanitizer rc=$rc")

step benchmark
args=(--out "$OUT/gpu_bench.json" --dir /tmp/pe_bench)
[ "$QUICK" = "--quick" ] && args+=(--types ${PE_BENCH_TYPES:-q4_0,q4_k} --no-torch)
timeout ${PE_BENCH_TIMEOUT:-240} $PY benchmarks/bench_gpu.py "${args[@]}" || failed+=("benchmark")

step summary
if [ ${#failed[@]} -eq 0 ]; then echo "gpu_check: all passed"; else echo "gpu_check: FAILED: ${failed[*]}"; exit 1; fi
