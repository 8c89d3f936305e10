#include "ops/elementwise.h"

#include "ops/dispatch.h"
#include "ops/matmul.h"

namespace pe {

void add(Executor& ex, const Tensor& x, const Tensor& y) {
  check_f32(ex, x, x.rows, x.cols, "add: x");
  check_f32(ex, y, x.rows, x.cols, "add: y");
  if (x.rows == 0) return;
  PE_DISPATCH(ex, add, ex, x, y);
}

void add_bias(Executor& ex, const Tensor& y, const Tensor& b) {
  check_f32(ex, y, y.rows, y.cols, "add_bias: y");
  check_f32(ex, b, 1, y.cols, "add_bias: bias");
  if (y.rows == 0) return;
  PE_DISPATCH(ex, add_bias, ex, y, b);
}

void scale(Executor& ex, const Tensor& x, float alpha, const Tensor& y) {
  check_f32(ex, x, x.rows, x.cols, "scale: x");
  check_f32(ex, y, x.rows, x.cols, "scale: y");
  if (x.rows == 0) return;
  PE_DISPATCH(ex, scale, ex, x, alpha, y);
}

void softcap(Executor& ex, const Tensor& x, float cap) {
  check_f32(ex, x, x.rows, x.cols, "softcap: x");
  PE_CHECK(cap > 0.f && cap < 1e30f, Error, "softcap: cap ", cap, " must be positive and finite");
  if (x.rows == 0) return;
  PE_DISPATCH(ex, softcap, ex, x, cap);
}

void get_rows(Executor& ex, const Tensor& table, const Tensor& ids, const Tensor& out) {
  check_device(ex, table, "get_rows: table");
  PE_CHECK(table.type == GGMLType::F32 || matmul_supports(table.type), UnsupportedModelError,
           "get_rows: unsupported type ", type_name(uint32_t(table.type)));
  PE_CHECK(table.row_stride >= row_bytes(table.type, table.cols), Error, "get_rows: table row stride too small");
  check_i32(ex, ids, ids.cols, "get_rows: ids");
  check_f32(ex, out, ids.cols, table.cols, "get_rows: out");
  if (ids.cols == 0) return;
  PE_DISPATCH(ex, get_rows, ex, table, ids, out);
}

}  // namespace pe
