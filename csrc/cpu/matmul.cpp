// Placeholder until the kernels land.
#include "ops/matmul.h"

namespace pe {
void matmul(const WeightView&, const float*, int64_t, int64_t, float*, int64_t, ThreadPool&) {
  PE_THROW(Error, "matmul not implemented");
}
void dequantize_row(const WeightView&, int64_t, float*) { PE_THROW(Error, "dequantize_row not implemented"); }
bool matmul_supports(GGMLType) { return false; }
}  // namespace pe
