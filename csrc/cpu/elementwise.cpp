#include <cmath>
#include <cstring>

#include "cpu/ops.h"

namespace pe::cpu {

// Element-wise ops are a few microseconds per layer at decode: they run on the calling thread unless
// the batch has many rows.
constexpr int64_t kParallelRows = 16;

void add(Executor& ex, const Tensor& x, const Tensor& y) {
  ex.pool().for_range(x.rows, kParallelRows, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; r++) {
      float* a = x.row(r);
      const float* b = y.row(r);
      for (int64_t i = 0; i < x.cols; i++) a[i] += b[i];
    }
  });
}

void add_bias(Executor& ex, const Tensor& y, const Tensor& b) {
  const float* bv = b.row(0);
  ex.pool().for_range(y.rows, kParallelRows, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; r++) {
      float* a = y.row(r);
      for (int64_t i = 0; i < y.cols; i++) a[i] += bv[i];
    }
  });
}

void scale(Executor& ex, const Tensor& x, float alpha, const Tensor& y) {
  ex.pool().for_range(x.rows, kParallelRows, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; r++) {
      const float* a = x.row(r);
      float* b = y.row(r);
      for (int64_t i = 0; i < x.cols; i++) b[i] = a[i] * alpha;
    }
  });
}

void softcap(Executor& ex, const Tensor& x, float cap) {
  ex.pool().for_range(x.rows, kParallelRows, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; r++) {
      float* a = x.row(r);
      for (int64_t i = 0; i < x.cols; i++) a[i] = cap * std::tanh(a[i] / cap);
    }
  });
}

void get_rows(Executor& ex, const Tensor& table, const Tensor& ids_t, const Tensor& out) {
  const int32_t* ids = static_cast<const int32_t*>(ids_t.data);
  for (int64_t i = 0; i < ids_t.cols; i++)
    PE_CHECK(ids[i] >= 0 && ids[i] < table.rows, Error, "get_rows: index ", ids[i], " at ", i,
             " is out of range [0, ", table.rows, ")");
  ex.pool().for_range(ids_t.cols, kParallelRows, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; i++) {
      if (table.type == GGMLType::F32)
        std::memcpy(out.row(i), table.row(ids[i]), size_t(table.cols) * sizeof(float));
      else
        dequantize_row(table, ids[i], out.row(i));
    }
  });
}

}  // namespace pe::cpu
