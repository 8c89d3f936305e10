// Which CPU kernel family runs: chosen once from CPUID, changed by PYENGINE_CPU or set_cpu_path().
#pragma once

namespace pe {

// Each path includes the ones below it: AMX is the AVX-512 path with the prefill matmuls of Q4_0 and
// Q8_0 weights on AMX tiles (int8: cpu/matmul_amx.h; bfloat16 for encoder passes: cpu/matmul_amx_bf16.h).
enum class CpuPath { Portable = 0, AVX2 = 1, AVX512 = 2, AMX = 3 };

const char* cpu_path_name(CpuPath p);
// Best path this CPU supports (AVX512 needs F, BW, VL, DQ and VNNI; AVX2 needs AVX2, FMA, F16C; AMX needs
// AVX512, AMX-TILE, AMX-INT8, AMX-BF16 and AVX512-BF16, the tile state enabled in XCR0 and the kernel able to grant it; the
// grant is asked for when the AMX path is chosen).
CpuPath best_cpu_path();
// Path in use: best_cpu_path() (AVX512 where that is AMX and the OS refuses the tile state), or a
// lower one that PYENGINE_CPU=portable|avx2|avx512|amx asks for.
CpuPath cpu_path();
// Force a path (tests). Throws pe::Error if the CPU lacks it.
void set_cpu_path(CpuPath p);
// Whether CPUID names AMD (or Hygon, its licensee) as the vendor: the kernels are the same code on
// every x86 CPU, but some memory-access choices measure differently (cpu/matmul_kernels.h DecodeTuning).
bool cpu_is_amd();

}  // namespace pe
