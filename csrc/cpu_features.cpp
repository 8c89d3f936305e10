#include "cpu_features.h"

#include <atomic>
#include <cstdlib>
#include <cstring>

#include "common.h"

#if defined(PE_X86)
#include <cpuid.h>
#endif
#if defined(PE_X86) && defined(__linux__)
#include <sys/syscall.h>
#include <unistd.h>
#endif

namespace pe {

namespace {

// Linux keeps AMX's 8 KiB tile state off until a process asks for it (arch_prctl, kernel 5.16+): a
// CPUID flag alone is not enough, and some VMs advertise AMX while refusing it. The leave is given to
// the whole process, threads started later included, and it enlarges every signal frame (a
// sigaltstack set up for the old size then fails), so it is asked for only when the AMX path is chosen.
constexpr long kArchGetXcompSupp = 0x1021, kArchReqXcompPerm = 0x1023, kXfeatureXtiledata = 18;

bool os_supports_amx() {
#if defined(PE_X86) && defined(__linux__)
  unsigned long features = 0;
  return syscall(SYS_arch_prctl, kArchGetXcompSupp, &features) == 0 && (features >> kXfeatureXtiledata & 1);
#else
  return false;
#endif
}

bool request_amx() {
#if defined(PE_X86) && defined(__linux__)
  static const bool granted = syscall(SYS_arch_prctl, kArchReqXcompPerm, kXfeatureXtiledata) == 0;
  return granted;
#else
  return false;
#endif
}

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
  const bool amx_bf16 = d & (1u << 22), amx_tile = d & (1u << 24), amx_int8 = d & (1u << 25),
             tiles_os = (xlo & 0x60000) == 0x60000;
  unsigned a1 = 0, b1 = 0, c1 = 0, d1 = 0;
  const bool avx512_bf16 = __get_cpuid_count(7, 1, &a1, &b1, &c1, &d1) && (a1 & (1u << 5));
  const bool amx = amx_tile && amx_int8 && amx_bf16 && avx512_bf16 && tiles_os;
  if (zmm_os && avx512f && avx512dq && avx512bw && avx512vl && vnni && avx2 && fma && f16c)
    return amx && os_supports_amx() ? CpuPath::AMX : CpuPath::AVX512;
  if (ymm_os && avx2 && fma && f16c) return CpuPath::AVX2;
#endif
  return CpuPath::Portable;
}

// The best path unless PYENGINE_CPU asks for a lower one. AMX needs the OS to grant this process the
// tile state, asked for only when AMX is the path; where it refuses, the path is AVX512.
CpuPath from_env(CpuPath best) {
  const char* env = std::getenv("PYENGINE_CPU");
  CpuPath want = best;
  if (env && *env) {
    if (!std::strcmp(env, "portable")) want = CpuPath::Portable;
    else if (!std::strcmp(env, "avx2")) want = CpuPath::AVX2;
    else if (!std::strcmp(env, "avx512")) want = CpuPath::AVX512;
    else if (!std::strcmp(env, "amx")) want = CpuPath::AMX;
    else PE_THROW(Error, "PYENGINE_CPU=", env, " is not one of portable, avx2, avx512, amx");
  }
  const CpuPath path = int(want) < int(best) ? want : best;
  return path == CpuPath::AMX && !request_amx() ? CpuPath::AVX512 : path;
}

std::atomic<int>& current() {
  static std::atomic<int> path{int(from_env(best_cpu_path()))};
  return path;
}

}  // namespace

const char* cpu_path_name(CpuPath p) {
  switch (p) {
    case CpuPath::AMX: return "amx";
    case CpuPath::AVX512: return "avx512";
    case CpuPath::AVX2: return "avx2";
    default: return "portable";
  }
}

CpuPath best_cpu_path() {
  static const CpuPath best = detect();
  return best;
}

bool cpu_is_amd() {
#if defined(PE_X86)
  static const bool amd = [] {
    unsigned a, b, c, d;
    if (!__get_cpuid(0, &a, &b, &c, &d)) return false;
    char vendor[13];
    std::memcpy(vendor, &b, 4);
    std::memcpy(vendor + 4, &d, 4);
    std::memcpy(vendor + 8, &c, 4);
    vendor[12] = 0;
    return !std::strcmp(vendor, "AuthenticAMD") || !std::strcmp(vendor, "HygonGenuine");
  }();
  return amd;
#else
  return false;
#endif
}

CpuPath cpu_path() { return CpuPath(current().load(std::memory_order_relaxed)); }

void set_cpu_path(CpuPath p) {
  PE_CHECK(int(p) <= int(best_cpu_path()), Error, "this CPU does not support the ", cpu_path_name(p),
           " path (best: ", cpu_path_name(best_cpu_path()), ")");
  PE_CHECK(p != CpuPath::AMX || request_amx(), Error,
           "the OS refused this process the AMX tile state (arch_prctl ARCH_REQ_XCOMP_PERM)");
  current().store(int(p));
}

}  // namespace pe
