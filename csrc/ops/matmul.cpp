#include "ops/matmul.h"

#include "ops/dispatch.h"

namespace pe {

bool matmul_supports(GGMLType t) { return cpu::matmul_supports(t); }

bool matmul_supports(GGMLType t, Device d) {
#ifdef PE_CUDA
  if (d == Device::CUDA) return cuda::matmul_supports(t);
#endif
  return d == Device::CPU && cpu::matmul_supports(t);
}

namespace {

void check_matmul(Executor& ex, const Tensor& w, const Tensor& x, const Tensor& y) {
  check_device(ex, w, "matmul: weights");
  PE_CHECK(matmul_supports(w.type, ex.device()), UnsupportedModelError, "matmul: weight type ",
           type_name(uint32_t(w.type)), " is not supported on ", device_name(ex.device()));
  PE_CHECK(w.rows >= 0 && w.cols > 0, Error, "matmul: bad weight shape ", w.rows, " x ", w.cols);
  const size_t rb = row_bytes(w.type, w.cols);  // throws if cols is not a multiple of the block size
  PE_CHECK(w.row_stride >= rb, Error, "matmul: weight row stride ", w.row_stride, " < row size ", rb);
  PE_CHECK(x.rows >= 0, Error, "matmul: negative number of rows");
  check_f32(ex, x, x.rows, w.cols, "matmul: x");
  check_f32(ex, y, x.rows, w.rows, "matmul: y");
  PE_CHECK(x.rows == 0 || w.rows == 0 || w.data, Error, "matmul: null weights");
}

}  // namespace

void matmul(Executor& ex, const Tensor& w, const Tensor& x, const Tensor& y, MatmulRounding rounding) {
  check_matmul(ex, w, x, y);
  if (x.rows == 0 || w.rows == 0) return;
  PE_DISPATCH(ex, matmul, ex, w, x, y, rounding);
}

void matmul(Executor& ex, const std::vector<Tensor>& ws, const Tensor& x, const std::vector<Tensor>& ys,
            MatmulRounding rounding) {
  PE_CHECK(ws.size() == ys.size() && !ws.empty(), Error, "matmul: ", ws.size(), " weights for ", ys.size(), " outputs");
  bool together = ex.device() == Device::CPU && ws.size() > 1;
  for (size_t i = 0; i < ws.size(); i++) {
    check_matmul(ex, ws[i], x, ys[i]);
    together &= ws[i].type == ws[0].type;
  }
  if (x.rows == 0) return;
  if (together) return cpu::matmul_group(ex, ws.data(), ys.data(), int(ws.size()), x, rounding);
  for (size_t i = 0; i < ws.size(); i++) matmul(ex, ws[i], x, ys[i], rounding);
}

}  // namespace pe
