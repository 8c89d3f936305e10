// Matrix multiplication with a (possibly quantized) weight matrix.
#pragma once
#include <vector>

#include "executor.h"
#include "tensor.h"

namespace pe {

// The kernels' name for a weight tensor: `rows` rows of `cols` elements of any GGUF type, as stored in
// the file (ggml's ne[0] is `cols`, ne[1] is `rows`).
using WeightView = Tensor;

// y = x W^T: x is F32 [m x w.cols], y is F32 [m x w.rows]. Quantized weights: x is quantized on the
// fly to 8-bit blocks (as ggml: Q8_0 / Q8_1 / Q8_K) and the dot products run on integers.
void matmul(Executor& ex, const Tensor& w, const Tensor& x, const Tensor& y);
// The same for weights that all read x (q, k and v; gate and up): ys[i] = x ws[i]^T. One call lets the
// CPU backend round x to 8 bits once and hand all their rows to its threads at once (a decode step
// of a small model waits on such hand-offs about as long as it reads weights); weights of different
// types, and other devices, run one by one.
void matmul(Executor& ex, const std::vector<Tensor>& ws, const Tensor& x, const std::vector<Tensor>& ys);

// Whether matmul accepts weights of this type (on the CPU, which runs every type a model may hold),
// and on a given device.
bool matmul_supports(GGMLType t);
bool matmul_supports(GGMLType t, Device d);

}  // namespace pe
