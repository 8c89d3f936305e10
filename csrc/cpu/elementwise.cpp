#include <cmath>
#include <cstring>
#include <vector>

#include "cpu/ops.h"
#include "cpu/panels.h"

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
    thread_local std::vector<uint8_t> row;  // a row of the panel copy, back in the file's layout
    for (int64_t i = i0; i < i1; i++) {
      Tensor src = table;
      int64_t r = ids[i];
      if (table.panels) {  // tied to the output: read the copy, not the file (see copy_panel_row)
        row.resize(table.row_stride);
        copy_panel_row(table, r, row.data());
        src.data = row.data(), src.rows = 1, src.panels = nullptr, r = 0;
      }
      if (src.type == GGMLType::F32)
        std::memcpy(out.row(i), src.row(r), size_t(src.cols) * sizeof(float));
      else
        dequantize_row(src, r, out.row(i));
    }
  });
}

}  // namespace pe::cpu
