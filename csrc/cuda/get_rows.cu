// Rows of a table picked by index (the token embedding lookup; rows of activations): one block per
// index, one 32-element chunk per thread, decoded by cuda/quant_blocks.cuh exactly as the CPU
// backend does it.
#include "cuda/common.cuh"
#include "cuda/ops.h"
#include "cuda/quant_blocks.cuh"

namespace pe::cuda {

namespace {

constexpr int kThreads = 128;

// out[i] = row ids[i] of the table, or zeros for an id outside [0, table_rows): the ids are on the
// GPU, so the op file cannot check them, and reading past the table is not an option.
template <GGMLType T>
__global__ void __launch_bounds__(kThreads, 1) get_rows_kernel(const uint8_t* __restrict__ table, int64_t table_rows,
                                                            int64_t cols, size_t stride,
                                                            const int32_t* __restrict__ ids, float* __restrict__ out,
                                                            int64_t ldo) {
  const int64_t i = blockIdx.x;
  const int32_t id = ids[i];
  const bool valid = id >= 0 && id < table_rows;
  const uint8_t* row = valid ? table + int64_t(id) * stride : nullptr;
  float* out_row = out + i * ldo;
  const int64_t n_chunks = (cols + kChunk - 1) / kChunk;
  for (int64_t c = threadIdx.x; c < n_chunks; c += kThreads) {
    float v[kChunk];
    if (valid) {
      dequantize_chunk<T>(row, cols, c, v);
    } else {
#pragma unroll
      for (int l = 0; l < kChunk; l++) v[l] = 0.0f;
    }
    const int64_t k0 = c * kChunk;
#pragma unroll
    for (int l = 0; l < kChunk; l++)
      if (k0 + l < cols) out_row[k0 + l] = v[l];
  }
}

bool aligned(const void* p, size_t a) { return reinterpret_cast<uintptr_t>(p) % a == 0; }

}  // namespace

void get_rows(Executor& ex, const Tensor& table, const Tensor& ids, const Tensor& out) {
  const int64_t n = ids.cols;
  if (n == 0) return;
  PE_CHECK(chunk_type_supported(table.type), UnsupportedModelError, "get_rows: no CUDA kernel for type ",
           type_name(uint32_t(table.type)));
  const size_t ta = size_t(chunk_row_alignment(table.type));
  PE_CHECK(aligned(table.data, ta) && table.row_stride % ta == 0, Error, "get_rows: ", type_name(uint32_t(table.type)),
           " table rows must be ", ta, "-byte aligned on the GPU");
  PE_CHECK(aligned(out.data, 4) && out.row_stride % 4 == 0, Error, "get_rows: out rows must be 4-byte aligned");
  PE_CHECK(n <= 0x7fffffff, Error, "get_rows: too many indices for one grid (", n, ")");
  // An empty table has no valid id: every output row is zeros, and the kernel never reads it.
  const auto* tp = static_cast<const uint8_t*>(table.data);
  const auto* ip = static_cast<const int32_t*>(ids.data);
  float* op = static_cast<float*>(out.data);
  visit_chunk_type(table.type, [&](auto type) {
    constexpr GGMLType T = decltype(type)::value;
    get_rows_kernel<T><<<unsigned(n), kThreads, 0, stream_of(ex)>>>(tp, table.rows, table.cols, table.row_stride, ip,
                                                                    op, out.ld());
    PE_CUDA_LAUNCHED();
  });
}

}  // namespace pe::cuda
