#include "cpu/vec.h"

#include "cpu_features.h"

namespace pe {

void vec_fp32_to_fp16(const float* x, fp16_t* y, int64_t n) {
#if defined(PE_X86)
  if (cpu_path() != CpuPath::Portable) return avx2::vec_fp32_to_fp16(x, y, n);  // AVX-512 too: F16C
#endif
  for (int64_t i = 0; i < n; i++) y[i] = fp32_to_fp16(x[i]);
}

}  // namespace pe
