#include "cpu_features.h"

#include <atomic>
#include <cstdlib>
#include <cstring>

#include "common.h"

#if defined(PE_X86)
#include <cpuid.h>
#endif

namespace pe {

namespace {

CpuPath detect() {
#if defined(PE_X86)
  unsigned a, b, c, d;
  if (!__get_cpuid(1, &a, &b, &c, &d)) return CpuPath::Portable;
  const bool fma = c & (1u << 12), osxsave = c & (1u << 27), avx = c & (1u << 28), f16c = c & (1u << 29);
  if (!(osxsave && avx)) return CpuPath::Portable;
  unsigned xlo, xhi;
  __asm__("xgetbv" : "=a"(xlo), "=d"(xhi) : "c"(0));
  const bool ymm_os = (xlo & 0x6) == 0x6, zmm_os = (xlo & 0xe6) == 0xe6;
  if (!__get_cpuid_count(7, 0, &a, &b, &c, &d)) return CpuPath::Portable;
  const bool avx2 = b & (1u << 5), avx512f = b & (1u << 16), avx512dq = b & (1u << 17),
             avx512bw = b & (1u << 30), avx512vl = b & (1u << 31), vnni = c & (1u << 11);
  if (zmm_os && avx512f && avx512dq && avx512bw && avx512vl && vnni && avx2 && fma && f16c) return CpuPath::AVX512;
  if (ymm_os && avx2 && fma && f16c) return CpuPath::AVX2;
#endif
  return CpuPath::Portable;
}

CpuPath from_env(CpuPath best) {
  const char* env = std::getenv("PYENGINE_CPU");
  if (!env || !*env) return best;
  CpuPath want;
  if (!std::strcmp(env, "portable")) want = CpuPath::Portable;
  else if (!std::strcmp(env, "avx2")) want = CpuPath::AVX2;
  else if (!std::strcmp(env, "avx512")) want = CpuPath::AVX512;
  else PE_THROW(Error, "PYENGINE_CPU=", env, " is not one of portable, avx2, avx512");
  return int(want) < int(best) ? want : best;
}

std::atomic<int>& current() {
  static std::atomic<int> path{int(from_env(best_cpu_path()))};
  return path;
}

}  // namespace

const char* cpu_path_name(CpuPath p) {
  switch (p) {
    case CpuPath::AVX512: return "avx512";
    case CpuPath::AVX2: return "avx2";
    default: return "portable";
  }
}

CpuPath best_cpu_path() {
  static const CpuPath best = detect();
  return best;
}

CpuPath cpu_path() { return CpuPath(current().load(std::memory_order_relaxed)); }

void set_cpu_path(CpuPath p) {
  PE_CHECK(int(p) <= int(best_cpu_path()), Error, "this CPU does not support the ", cpu_path_name(p),
           " path (best: ", cpu_path_name(best_cpu_path()), ")");
  current().store(int(p));
}

}  // namespace pe
