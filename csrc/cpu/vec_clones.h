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

}  // namespace pe::cpu
