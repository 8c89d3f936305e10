// Plain C++ loops compiled for several x86-64 levels: PE_VEC_CLONES makes GCC build an AVX-512 (x86-64-v4)
// and an AVX2+FMA (v3) copy of a function beside the baseline one and pick by CPUID at load time (the
// wheel runs on any x86-64). VF / VI are 16 floats / int32s as GCC vector types, which each copy lowers
// to its own registers (one zmm, two ymm, four xmm): code that wants its lanes written out uses them,
// except to compare lanes (VF8 below).
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
// 8 floats / int32s: one register in the AVX2 copy as in the AVX-512 one. Loops that compare lanes use
// them: GCC turns a comparison (or a ?: on its result) of the 16-lane types into scalar code where the
// registers are narrower (the AVX2 copy of top_logits' max pass took 122 us a 49,152-float row, against
// 4.4 in the AVX-512 copy, on the same Zen 4; as 8-lane halves, 5.7 in both).
typedef float VF8 __attribute__((vector_size(32)));
typedef int32_t VI8 __attribute__((vector_size(32)));

// e^t for t <= 0, 8 at a time: t = n ln2 + r with |r| <= ln2 / 2, e^r by Cephes' degree-6 polynomial (as
// attention's softmax; ~2 ulp), times 2^n. t below -87.3 gives e^-87.3 (~1e-38) instead of a denormal.
__attribute__((always_inline)) inline VF8 exp_nonpositive8(VF8 t) {
  const VI8 low = (VI8)(t < -87.3f);
  t = (VF8)((low & (VI8)(VF8{} - 87.3f)) | (~low & (VI8)t));
  const VF8 n = (t * 1.44269504088896341f + 12582912.f) - 12582912.f;  // round to nearest
  VF8 r = t - n * 0.693359375f;  // ln 2 in two parts, so that r is exact
  r = r + n * 2.12194440e-4f;
  VF8 p = VF8{} + 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + (r + 1.f);
  return p * (VF8)((__builtin_convertvector(n, VI8) + 127) << 23);
}

}  // namespace pe::cpu
