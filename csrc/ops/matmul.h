// Matrix multiplication with a (possibly quantized) weight matrix.
#pragma once
#include "executor.h"
#include "tensor.h"

namespace pe {

// The kernels' name for a weight tensor: `rows` rows of `cols` elements of any GGUF type, as stored in
// the file (ggml's ne[0] is `cols`, ne[1] is `rows`).
using WeightView = Tensor;

// y = x W^T: x is F32 [m x w.cols], y is F32 [m x w.rows]. Quantized weights: x is quantized on the
// fly to 8-bit blocks (as ggml: Q8_0 / Q8_1 / Q8_K) and the dot products run on integers.
void matmul(Executor& ex, const Tensor& w, const Tensor& x, const Tensor& y);

// Whether matmul accepts weights of this type (on the CPU, which runs every type a model may hold),
// and on a given device.
bool matmul_supports(GGMLType t);
bool matmul_supports(GGMLType t, Device d);

}  // namespace pe
