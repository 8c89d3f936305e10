#!/usr/bin/env bash
# Builds the GGUF fuzzer (clang, libFuzzer + ASan + UBSan) and runs it.
#
#   tests/fuzz/run.sh [SECONDS] [extra libFuzzer flags...]     # default 180 s
#
# Needs clang++ with the libFuzzer runtime (Debian: apt-get install clang libclang-rt-dev) and, to
# write the seed corpus, python with numpy and gguf. Objects go to tests/fuzz/build/ (rebuilt when a
# source is newer); the corpus grows in tests/fuzz/build/corpus (seeds from make_seeds.py), crashes
# land in tests/fuzz/build/artifacts. Exit status: 0 when nothing was found, non-zero otherwise.
set -euo pipefail
HERE="$(cd "$(dirname "$0")" && pwd)"
ROOT="$(cd "$HERE/../.." && pwd)"
SECONDS_TO_RUN="${1:-180}"
shift || true
OUT="$HERE/build"
CXX="${CXX:-clang++}"
JOBS="${JOBS:-$(nproc)}"
mkdir -p "$OUT/obj" "$OUT/corpus" "$OUT/artifacts"

SAN="-fsanitize=fuzzer-no-link,address,undefined -fno-sanitize-recover=undefined -fno-omit-frame-pointer"
# -O0 by default: clang at -O1 spends ~4 minutes on the AVX-512 matmul alone with coverage
# instrumentation (the whole -O0 build takes ~30 s on 2 cores), and the -O0 fuzzer ran no slower
# (103 against 71 executions/s). FUZZ_OPT=-O1 for another build; objects do not record the level,
# so clear build/obj to switch.
CXXFLAGS="-std=c++17 ${FUZZ_OPT:--O0} -g $SAN -DPE_X86=1 -I$ROOT/csrc -Wno-unused-command-line-argument -Wno-unknown-warning-option"

compile() {  # source -> object, with the ISA flags the CMake build gives it
  src="$1"
  obj="$OUT/obj/$(echo "${src#$ROOT/}" | tr / _).o"
  isa=""
  case "$src" in
    *_avx512.cpp) isa="-mavx512f -mavx512bw -mavx512vl -mavx512dq -mavx512vnni -mavx2 -mfma -mf16c" ;;
    *_avx2.cpp) isa="-mavx2 -mfma -mf16c" ;;
  esac
  case "$src" in  # as CMakeLists.txt: the AVX-512 matmul file also holds the AMX prefill
    */matmul_avx512.cpp) isa="$isa -mamx-tile -mamx-int8 -mamx-bf16 -mavx512bf16" ;;
  esac
  if [ ! -f "$obj" ] || [ -n "$(find "$ROOT/csrc" -name '*.h' -newer "$obj" -print -quit)" ] || [ "$src" -nt "$obj" ]; then
    $CXX $CXXFLAGS $isa -c "$src" -o "$obj"
  fi
  echo "$obj"
}
export -f compile
export ROOT OUT CXX CXXFLAGS

sources=$(ls "$ROOT"/csrc/*.cpp "$ROOT"/csrc/cpu/*.cpp "$ROOT"/csrc/ops/*.cpp "$ROOT"/csrc/model/*.cpp \
          "$HERE/fuzz_gguf.cpp" | grep -v '/bindings')
objects=$(printf '%s\n' $sources | xargs -P "$JOBS" -I{} bash -c 'compile "$1"' _ {})
$CXX -fsanitize=fuzzer,address,undefined $objects -lpthread -o "$OUT/fuzz_gguf"

if [ -z "$(ls -A "$OUT/corpus")" ]; then
  python "$HERE/make_seeds.py" "$OUT/corpus"
fi
# Inputs that once found a bug run first, every time.
"$OUT/fuzz_gguf" -runs=0 "$HERE/regressions"/* >/dev/null 2>&1 || { echo "a regression input fails:"; "$OUT/fuzz_gguf" -runs=0 "$HERE/regressions"/*; exit 1; }

# detect_leaks=0: the engine keeps per-thread scratch buffers and one executor for the whole run.
export ASAN_OPTIONS="detect_leaks=0:allocator_may_return_null=0:${ASAN_OPTIONS:-}"
export UBSAN_OPTIONS="print_stacktrace=1:halt_on_error=1:${UBSAN_OPTIONS:-}"
"$OUT/fuzz_gguf" "$OUT/corpus" -artifact_prefix="$OUT/artifacts/" -max_total_time="$SECONDS_TO_RUN" \
  -max_len=327680 -rss_limit_mb=4096 -malloc_limit_mb=1024 -timeout=20 -print_final_stats=1 "$@"
