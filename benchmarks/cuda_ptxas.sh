#!/usr/bin/env bash
# Registers, shared memory and spills of every CUDA kernel for every default architecture (ptxas -v),
# into benchmarks/results/cuda_ptxas.txt. Needs nvcc only (no GPU).
#   benchmarks/cuda_ptxas.sh [ARCHS]     (default "80 86 89 90")
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=benchmarks/results/cuda_ptxas.txt
ARCHS=${1:-80 86 89 90}
{
  echo "# ptxas -v for csrc/cuda/*.cu, $(nvcc --version | tail -1), $(date -u +%F)"
  for arch in $ARCHS; do
    for f in csrc/cuda/*.cu; do
      echo "## $f sm_$arch"
      nvcc -std=c++17 -O3 -arch=sm_$arch -Icsrc -Xptxas -v -c "$f" -o /dev/null 2>&1 \
        | grep -E "Compiling entry|Used|spill" | sed -E 's/ptxas info *: //' | c++filt
    done
  done
} > "$OUT"
echo "spills (non-zero):"; grep -E "[1-9][0-9]* bytes spill" "$OUT" || echo "  none"
