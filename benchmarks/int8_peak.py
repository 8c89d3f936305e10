"""The CPU's own ceiling for the int8 kernels: how many vpdpbusd (AVX-512 VNNI) one core retires per
second, alone and with the two float operations the quantized kernels spend per 8 of them.

Every quantized matmul on the AVX-512 path ends each 32-element block of each (weight panel, activation
row) pair with 8 vpdpbusd (the integer dot products) and then a convert, a multiply and a fused
multiply-add (the scales). On AMD Zen 4 the 512-bit multiply and FMA issue on the same pipes as
vpdpbusd, so those two float operations take two of every ten issue slots: a compute-bound kernel
(prefill, a decode step of many sequences) cannot pass 80 % of the bare vpdpbusd rate there. This
probe measures both rates on the machine it runs on, so that a kernel's GMAC/s can be read against
them (bench_kernels.py --int8-peak). It compiles a few lines of C with the system's `cc`; None
where there is no compiler or no AVX-512 VNNI.

    python benchmarks/int8_peak.py
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile

# Independent accumulator chains so that latency never limits; the asm barrier keeps the compiler
# from hoisting the loop-invariant work. Prints vpdpbusd per second for: vpdpbusd alone; with one
# multiply and one FMA per 8 (the kernels' scale step, the convert is free); with two FMAs per 8.
_PROBE = r"""
#include <immintrin.h>
#include <stdio.h>
#include <time.h>
static double now(void) { struct timespec t; clock_gettime(CLOCK_MONOTONIC, &t); return t.tv_sec + 1e-9 * t.tv_nsec; }
int main(void) {
  __m512i a[8]; __m512 f[4];
  __m512i w = _mm512_set1_epi32(0x01020304), x = _mm512_set1_epi32(0x01010101);
  __m512 s = _mm512_set1_ps(1.0f);
  for (int i = 0; i < 8; i++) a[i] = _mm512_set1_epi32(i);
  for (int i = 0; i < 4; i++) f[i] = _mm512_set1_ps((float)i);
  const long n = 40000000;
  for (int mode = 0; mode < 2; mode++) {
    double best = 0;
    for (int rep = 0; rep < 3; rep++) {
      const double t0 = now();
      for (long k = 0; k < n; k++) {
#pragma GCC unroll 8
        for (int i = 0; i < 8; i++) a[i] = _mm512_dpbusd_epi32(a[i], w, x);
        if (mode == 1) {  /* one multiply and one FMA per 8, on chains of their own */
          f[0] = _mm512_fmadd_ps(_mm512_mul_ps(_mm512_cvtepi32_ps(a[0]), s), s, f[0]);
          __asm__ volatile("" : "+v"(f[0]), "+v"(f[1]), "+v"(f[2]), "+v"(f[3]));
          __m512 t = f[0]; f[0] = f[1]; f[1] = f[2]; f[2] = f[3]; f[3] = t;
        }
        __asm__ volatile("" : "+v"(w), "+v"(s));
      }
      const double r = 8.0 * n / (now() - t0);
      if (r > best) best = r;
    }
    printf("%.6e\n", best);
  }
  __m512i z = a[0]; __m512 g = f[0];
  for (int i = 1; i < 8; i++) z = _mm512_add_epi32(z, a[i]);
  for (int i = 1; i < 4; i++) g = _mm512_add_ps(g, f[i]);
  return (_mm512_reduce_add_epi32(z) == 42) + (_mm512_reduce_add_ps(g) == 42.0f);
}
"""


def _has_vnni512() -> bool:
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line for line in f if line.startswith("flags")), "").split()
    except OSError:
        return False
    return "avx512_vnni" in flags and "avx512f" in flags


_exe: str | None = None


def _compile() -> str | None:
    """The probe's executable (built once per process), or None without a compiler or VNNI."""
    global _exe
    if _exe is None:
        cc = shutil.which(os.environ.get("CC", "cc")) or shutil.which("gcc")
        if cc is None or not _has_vnni512():
            return None
        d = tempfile.mkdtemp(prefix="int8_peak_")
        src, exe = os.path.join(d, "probe.c"), os.path.join(d, "probe")
        with open(src, "w") as f:
            f.write(_PROBE)
        if subprocess.run([cc, "-O2", "-mavx512f", "-mavx512vnni", "-o", exe, src], capture_output=True).returncode:
            return None  # a compiler without these flags
        _exe = exe
    return _exe


def measure() -> dict | None:
    """{"vpdpbusd_per_s", "gmac_per_s", "with_scale_step_gmac_per_s"} for one core now (64 MACs per
    vpdpbusd; a shared machine's speed moves, so measure next to what it is compared with), or None
    without a C compiler or AVX-512 VNNI."""
    exe = _compile()
    if exe is None:
        return None
    out = subprocess.run([exe], capture_output=True, text=True).stdout.split()
    alone, with_scale = float(out[0]), float(out[1])
    return {"vpdpbusd_per_s": alone, "gmac_per_s": 64 * alone / 1e9, "with_scale_step_gmac_per_s": 64 * with_scale / 1e9}


if __name__ == "__main__":
    r = measure()
    if r is None:
        print("no C compiler or no AVX-512 VNNI: nothing measured")
    else:
        print(f"one core: {r['gmac_per_s']:.1f} GMAC/s of vpdpbusd alone, "
              f"{r['with_scale_step_gmac_per_s']:.1f} with a multiply and an FMA per 8")
        print(json.dumps(r))
