// Plain C++ loops compiled for several x86-64 levels: PE_VEC_CLONES makes GCC build an AVX-512 (x86-64-v4)
// and an AVX2+FMA (v3) copy of a function beside the baseline one and pick by CPUID at load time (the
// wheel runs on any x86-64). VF / VI are 16 floats / int32s as GCC vector types, which each copy lowers
// to its own registers (one zmm, two ymm, four xmm): code that wants its lanes written out uses them.
// Files using these types in always-inline helpers are built with -Wno-psabi (see CMakeLists.txt).
#pragma once
#include <cstdint>

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define PE_VEC_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define PE_VEC_CLONES
#endif

namespace pe::cpu {

typedef float VF __attribute__((vector_size(64)));
typedef int32_t VI __attribute__((vector_size(64)));

// e^t for t <= 0, 16 at a time: t = n ln2 + r with |r| <= ln2 / 2, e^r by Cephes' degree-6 polynomial (as
// attention's softmax; ~2 ulp), times 2^n. t below -87.3 gives e^-87.3 (~1e-38) instead of a denormal.
__attribute__((always_inline)) inline VF exp_nonpositive16(VF t) {
  const VI low = (VI)(t < -87.3f);
  t = (VF)((low & (VI)(VF{} - 87.3f)) | (~low & (VI)t));
  const VF n = (t * 1.44269504088896341f + 12582912.f) - 12582912.f;  // round to nearest
  VF r = t - n * 0.693359375f;  // ln 2 in two parts, so that r is exact
  r = r + n * 2.12194440e-4f;
  VF p = VF{} + 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + (r + 1.f);
  return p * (VF)((__builtin_convertvector(n, VI) + 127) << 23);
}

}  // namespace pe::cpu
