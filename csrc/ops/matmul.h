// Matrix multiplication with a (possibly quantized) weight matrix.
#pragma once
#include <vector>

#include "executor.h"
#include "tensor.h"

namespace pe {

// The kernels' name for a weight tensor: `rows` rows of `cols` elements of any GGUF type, as stored in
// the file (ggml's ne[0] is `cols`, ne[1] is `rows`).
using WeightView = Tensor;

// How a matmul with quantized weights may round x.
//   Int8  x in 8-bit blocks (as ggml: Q8_0 / Q8_1 / Q8_K), dot products on integers. A row's result is
//         the same whatever other rows share the call, so batching sequences changes nothing.
//   Bf16  where the CPU path is amx, a call of many rows may instead round x and W's values to bfloat16
//         for the matrix unit (cpu/matmul_amx_bf16.h): finer than Int8, but a row's result then depends
//         on the call's size. For passes over one input alone (an encoder's input); elsewhere it is Int8.
enum class MatmulRounding { Int8, Bf16 };

// y = x W^T: x is F32 [m x w.cols], y is F32 [m x w.rows]. Quantized weights: x is rounded as `rounding`
// says (Int8: quantized on the fly, integer dot products).
void matmul(Executor& ex, const Tensor& w, const Tensor& x, const Tensor& y,
            MatmulRounding rounding = MatmulRounding::Int8);
// The same for weights that all read x (q, k and v; gate and up): ys[i] = x ws[i]^T. One call lets the
// CPU backend round x to 8 bits once and hand all their rows to its threads at once (a decode step
// of a small model waits on such hand-offs about as long as it reads weights); weights of different
// types, and other devices, run one by one.
void matmul(Executor& ex, const std::vector<Tensor>& ws, const Tensor& x, const std::vector<Tensor>& ys,
            MatmulRounding rounding = MatmulRounding::Int8);

// Whether matmul accepts weights of this type (on the CPU, which runs every type a model may hold),
// and on a given device.
bool matmul_supports(GGMLType t);
bool matmul_supports(GGMLType t, Device d);

}  // namespace pe
