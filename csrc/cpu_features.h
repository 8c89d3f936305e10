// Which CPU kernel family runs: chosen once from CPUID, lowered by PYENGINE_CPU or set_cpu_path().
#pragma once

namespace pe {

enum class CpuPath { Portable = 0, AVX2 = 1, AVX512 = 2 };

const char* cpu_path_name(CpuPath p);
// Best path this CPU supports (AVX512 needs F, BW, VL, DQ and VNNI; AVX2 needs AVX2, FMA, F16C).
CpuPath best_cpu_path();
// Path in use: best_cpu_path(), or lower if PYENGINE_CPU=portable|avx2|avx512 asks for it.
CpuPath cpu_path();
// Force a path (tests). Throws pe::Error if the CPU lacks it.
void set_cpu_path(CpuPath p);

}  // namespace pe
