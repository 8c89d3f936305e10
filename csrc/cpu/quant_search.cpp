#include "cpu/quant_search.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <memory>
#include <mutex>

#include "common.h"
#include "cpu/quant_blocks.h"
#include "cpu/quantize.h"
#include "cpu/vec_clones.h"
#include "threadpool.h"

namespace pe::cpu {

namespace {

// The inner loops below are plain C++ that the compiler vectorizes, built per x86-64 level (PE_VEC_CLONES).

PE_VEC_CLONES double dot_f64(const double* __restrict a, const double* __restrict b, int64_t n) {
  double s[32] = {};  // independent sums: the FMA latency, not the loads, would bound a single chain
  int64_t i = 0;
  for (; i + 32 <= n; i += 32)
    for (int k = 0; k < 32; k++) s[k] += a[i + k] * b[i + k];
  double t = 0;
  for (; i < n; i++) t += a[i] * b[i];
  for (int k = 0; k < 32; k++) t += s[k];
  return t;
}

PE_VEC_CLONES double dot_f32(const float* __restrict a, const float* __restrict b, int64_t n) {
  float s[64] = {};  // four vectors of independent sums (one would wait on the FMA latency)
  int64_t i = 0;
  for (; i + 64 <= n; i += 64)
    for (int k = 0; k < 64; k++) s[k] += a[i + k] * b[i + k];
  for (; i + 16 <= n; i += 16)
    for (int k = 0; k < 16; k++) s[k] += a[i + k] * b[i + k];
  double t = 0;
  for (; i < n; i++) t += double(a[i]) * b[i];
  for (int k = 0; k < 64; k++) t += s[k];
  return t;
}

PE_VEC_CLONES void axpy_f32(float* __restrict y, const float* __restrict x, float a, int64_t n) {
  for (int64_t i = 0; i < n; i++) y[i] += a * x[i];
}

// h[i, j..n) += sum over 8 rows r of x_r[i] * x_r[j..n), for i in [i0, i1).
PE_VEC_CLONES void xtx_rows8(const float* const* xr, int64_t i0, int64_t i1, int64_t n, float* h) {
  const float* __restrict x0 = xr[0];
  const float* __restrict x1 = xr[1];
  const float* __restrict x2 = xr[2];
  const float* __restrict x3 = xr[3];
  const float* __restrict x4 = xr[4];
  const float* __restrict x5 = xr[5];
  const float* __restrict x6 = xr[6];
  const float* __restrict x7 = xr[7];
  for (int64_t i = i0; i < i1; i++) {
    const float a0 = x0[i], a1 = x1[i], a2 = x2[i], a3 = x3[i], a4 = x4[i], a5 = x5[i], a6 = x6[i], a7 = x7[i];
    float* __restrict hi = h + i * n;
    for (int64_t j = i; j < n; j++)
      hi[j] += ((a0 * x0[j] + a1 * x1[j]) + (a2 * x2[j] + a3 * x3[j])) +
               ((a4 * x4[j] + a5 * x5[j]) + (a6 * x6[j] + a7 * x7[j]));
  }
}

}  // namespace

void accumulate_xtx(const float* x, int64_t rows, int64_t ld, int64_t n, float* h, ThreadPool* pool) {
  const std::vector<float> zero_row(size_t(rows % 8 ? n : 0), 0.0f);  // pads the last group of 8 rows
  // Bands of h rows; row i costs n - i, so bands are handed out dynamically from the top.
  const int64_t band = 16, n_bands = (n + band - 1) / band;
  auto run = [&](int64_t b) {
    const int64_t i0 = b * band, i1 = std::min(n, i0 + band);
    for (int64_t r0 = 0; r0 < rows; r0 += 8) {
      const float* xr[8];
      for (int k = 0; k < 8; k++) xr[k] = r0 + k < rows ? x + (r0 + k) * ld : zero_row.data();
      xtx_rows8(xr, i0, i1, n, h);
    }
  };
  if (pool && pool->size() > 1 && n_bands > 1)
    pool->for_each_dynamic(n_bands, run);
  else
    for (int64_t b = 0; b < n_bands; b++) run(b);
}

FeedbackPlan make_feedback_plan(const float* h, int64_t n, int64_t block, double damp, ThreadPool* pool) {
  PE_CHECK(n > 0 && block > 0 && n % block == 0, Error, "error feedback: ", n, " columns are not a multiple of the ",
           block, "-element block");
  FeedbackPlan plan;
  plan.n = n;
  plan.block = block;
  plan.h.resize(size_t(n * n));
  auto H = [&](int64_t p, int64_t q) { return double(p <= q ? h[p * n + q] : h[q * n + p]); };
  double mean_diag = 0;
  for (int64_t i = 0; i < n; i++) {
    for (int64_t j = 0; j < n; j++) plan.h[size_t(i * n + j)] = float(H(i, j));
    mean_diag += H(i, i);
  }
  mean_diag /= double(n);
  if (!(mean_diag > 0) || !std::isfinite(mean_diag)) mean_diag = 1;
  const double add = damp * mean_diag;

  // H = R R^T with R upper triangular comes from the lower Cholesky factor L' of H with rows and columns
  // reversed (R = J L' J); then H^-1 = U^T U with U = R^-1 = J L'^-1 J, so U needs one factorization and
  // one triangular inverse, no full inverse.
  std::vector<double> a(size_t(n * n), 0.0);
  for (int64_t i = 0; i < n; i++)
    for (int64_t j = 0; j <= i; j++) a[size_t(i * n + j)] = H(n - 1 - i, n - 1 - j) + (i == j ? add : 0.0);
  // Row-oriented Cholesky in bands of rows: once the rows above a band are done, each row of the band can
  // fill its columns left of the band on its own (threads split the band), then the band's own triangle
  // is finished in order.
  auto row_part = [&](int64_t i, int64_t j0, int64_t j1) {
    double* ai = a.data() + i * n;
    for (int64_t j = j0; j < j1; j++) ai[j] = (ai[j] - dot_f64(ai, a.data() + j * n, j)) / a[size_t(j * n + j)];
  };
  const int64_t band = 32;
  for (int64_t i0 = 0; i0 < n; i0 += band) {
    const int64_t i1 = std::min(n, i0 + band);
    if (pool && pool->size() > 1 && i0 > 0)
      pool->for_each_dynamic(i1 - i0, [&](int64_t r) { row_part(i0 + r, 0, i0); });
    else
      for (int64_t i = i0; i < i1; i++) row_part(i, 0, i0);
    for (int64_t i = i0; i < i1; i++) {
      row_part(i, i0, i);
      double* ai = a.data() + i * n;
      const double d = ai[i] - dot_f64(ai, ai, i);
      PE_CHECK(d > 0 && std::isfinite(d), Error, "error feedback: the input covariance is not positive definite "
               "after dampening (column ", n - 1 - i, ")");
      ai[i] = std::sqrt(d);
    }
  }
  // t = (L'^-1)^T, upper: t[j][i] = (L'^-1)_ij for i >= j; row j of t times row i of L' is contiguous.
  std::vector<double> t(size_t(n * n), 0.0);
  auto invert_column = [&](int64_t j) {  // columns of the inverse are independent
    double* tj = t.data() + j * n;
    tj[j] = 1.0 / a[size_t(j * n + j)];
    for (int64_t i = j + 1; i < n; i++) tj[i] = -dot_f64(a.data() + i * n + j, tj + j, i - j) / a[size_t(i * n + i)];
  };
  if (pool && pool->size() > 1)
    pool->for_each_dynamic(n, invert_column);
  else
    for (int64_t j = 0; j < n; j++) invert_column(j);
  // Row j of plan.u: U_jk / U_jj for k > j, what column j's rounding error is pushed onto column k with.
  // U_pq = t[n-1-q][n-1-p]: a transpose, done in tiles so that neither side is read with a stride of n.
  plan.u.assign(size_t(n * n), 0.0f);
  const int64_t tile = 64, n_tiles = (n + tile - 1) / tile;
  auto fill_tile_row = [&](int64_t pt) {
    const int64_t p0 = pt * tile, p1 = std::min(n, p0 + tile);
    for (int64_t q0 = p0; q0 < n; q0 += tile) {
      const int64_t q1 = std::min(n, q0 + tile);
      for (int64_t q = q0; q < q1; q++) {
        const double* tq = t.data() + (n - 1 - q) * n + (n - 1);
        for (int64_t p = p0; p < std::min(p1, q); p++) plan.u[size_t(p * n + q)] = float(*(tq - p));
      }
    }
    for (int64_t p = p0; p < p1; p++) {
      const double upp = t[size_t((n - 1 - p) * n + (n - 1 - p))];
      float* up = plan.u.data() + p * n;
      for (int64_t q = p + 1; q < n; q++) up[q] = float(double(up[q]) / upp);
    }
  };
  if (pool && pool->size() > 1)
    pool->for_each_dynamic(n_tiles, fill_tile_row);
  else
    for (int64_t pt = 0; pt < n_tiles; pt++) fill_tile_row(pt);
  return plan;
}

double weighted_error(const FeedbackPlan& plan, const float* e) {
  double s = 0;
  for (int64_t i = 0; i < plan.n; i++)
    if (e[i] != 0.0f) s += double(e[i]) * dot_f32(plan.h.data() + i * plan.n, e, plan.n);
  return s;
}

namespace {

// out[r] = a_r H a_r^T - b_r H b_r^T for the k rows of a and b, as (a - b) H (a + b)^T (H symmetric): one pass
// over H instead of two, each row of H read once for all k rows (H of a wide layer does not fit in the
// cache, and streaming it once per row would bound the whole search).
void weighted_error_differences(const FeedbackPlan& plan, const float* a, const float* b, int64_t k, double* out) {
  const int64_t n = plan.n;
  std::vector<float> d(size_t(k * n)), s(d.size());
  for (size_t i = 0; i < d.size(); i++) d[i] = a[i] - b[i], s[i] = a[i] + b[i];
  std::fill(out, out + k, 0.0);
  for (int64_t i = 0; i < n; i++) {
    const float* hi = plan.h.data() + i * n;
    for (int64_t r = 0; r < k; r++) {
      const float di = d[size_t(r * n + i)];
      if (di != 0.0f) out[r] += double(di) * dot_f32(hi, s.data() + r * n, n);
    }
  }
}

}  // namespace

namespace {

// Where each bit of each element's code u (quant_blocks.h) lives in a ggml block, found by flipping the
// block's bits one at a time and unpacking: one generic packer for every type, the inverse of the
// unpacker the kernels use. Bits that change no u (scales, mins) are left as ggml's search wrote them.
struct CodeBits {
  std::vector<uint8_t> u0;                    // u of an all-zero block
  std::vector<std::vector<int32_t>> where;    // [element][bit of u] -> byte * 8 + bit in the block
};

const CodeBits& code_bits(const QuantScheme& s) {
  static std::mutex mu;
  static std::vector<std::pair<GGMLType, std::unique_ptr<CodeBits>>> cache;
  std::lock_guard<std::mutex> lock(mu);
  for (const auto& [t, c] : cache)
    if (t == s.type) return *c;
  auto c = std::make_unique<CodeBits>();
  std::vector<uint8_t> blk(size_t(s.block_bytes), 0), u(size_t(s.block));
  std::vector<float> scale(size_t(s.block / s.sub)), min(scale.size());
  c->u0.resize(size_t(s.block));
  unpack_block(s, blk.data(), c->u0.data(), scale.data(), min.data());
  c->where.assign(size_t(s.block), std::vector<int32_t>(8, -1));
  for (int byte = 0; byte < s.block_bytes; byte++)
    for (int bit = 0; bit < 8; bit++) {
      blk[size_t(byte)] = uint8_t(1u << bit);
      unpack_block(s, blk.data(), u.data(), scale.data(), min.data());
      blk[size_t(byte)] = 0;
      for (int e = 0; e < s.block; e++) {
        const unsigned d = unsigned(u[size_t(e)] ^ c->u0[size_t(e)]);
        if (d == 0) continue;
        PE_CHECK((d & (d - 1)) == 0, Error, "error feedback: ", type_name(uint32_t(s.type)),
                 ": a block bit changes more than one bit of a code");
        int k = 0;
        while (!(d >> k & 1)) k++;
        c->where[size_t(e)][size_t(k)] = byte * 8 + bit;
      }
    }
  cache.emplace_back(s.type, std::move(c));
  return *cache.back().second;
}

void pack_codes(const QuantScheme& s, const CodeBits& cb, const uint8_t* u, uint8_t* blk) {
  for (int e = 0; e < s.block; e++) {
    const unsigned x = unsigned(u[e] ^ cb.u0[size_t(e)]);
    for (int k = 0; k < 8; k++) {
      const int32_t at = cb.where[size_t(e)][size_t(k)];
      if (at < 0) continue;
      const uint8_t m = uint8_t(1u << (at & 7));
      blk[at >> 3] = uint8_t(x >> k & 1 ? blk[at >> 3] | m : blk[at >> 3] & ~m);
    }
  }
}

}  // namespace

int64_t quantize_rows_feedback(GGMLType t, const FeedbackPlan& plan, const float* src, int64_t n_rows,
                               const float* importance, void* dst) {
  const QuantScheme* sc = quant_scheme(t);
  PE_CHECK(sc, UnsupportedModelError, "error feedback: unsupported type ", type_name(uint32_t(t)));
  const CodeBits& cb = code_bits(*sc);
  const int64_t n = plan.n, B = sc->block, nb = n / B, n_sub = B / sc->sub;
  const size_t rb = row_bytes(t, n), bb = size_t(sc->block_bytes);
  PE_CHECK(B == plan.block && rb == bb * size_t(nb), Error, "error feedback: block size ", plan.block,
           " does not match the type's blocks");
  // The rows of a batch advance column by column together, so each row of U is read once per batch.
  const size_t k = size_t(n_rows);
  std::vector<float> w(k * size_t(n)), e(2 * k * size_t(n)), scale(k * size_t(n_sub)), min(scale.size());
  std::vector<uint8_t> u(k * size_t(B)), plain(k * rb);
  std::vector<double> loss(k);
  std::memcpy(w.data(), src, k * size_t(n) * sizeof(float));
  uint8_t* out = static_cast<uint8_t*>(dst);
  for (int64_t b = 0; b < nb; b++) {
    const int64_t s = b * B;
    // ggml's search picks the block's scales (and mins) on the weights as the earlier blocks left them
    for (size_t r = 0; r < k; r++) {
      uint8_t* blk = out + r * rb + size_t(b) * bb;
      quantize_rows(t, w.data() + r * size_t(n) + s, 1, B, importance ? importance + s : nullptr, blk);
      unpack_block(*sc, blk, u.data() + r * size_t(B), scale.data() + r * size_t(n_sub), min.data() + r * size_t(n_sub));
    }
    // then each column is rounded to that grid and its error pushed onto the columns after it
    for (int64_t c = 0; c < B; c++) {
      const int64_t j = s + c, sub = c / sc->sub;
      const float* uj = plan.u.data() + j * n;
      for (size_t r = 0; r < k; r++) {
        float* wr = w.data() + r * size_t(n);
        const float d = scale[r * size_t(n_sub) + size_t(sub)], m = sc->has_min ? min[r * size_t(n_sub) + size_t(sub)] : 0.0f;
        uint8_t& code = u[r * size_t(B) + size_t(c)];
        if (d != 0.0f) {
          const float v = std::nearbyint((wr[j] - m) / d) + float(sc->offset);
          code = uint8_t(std::min(float(sc->max_u), std::max(0.0f, v)));
        }
        const float q = sc->has_min ? d * float(code) + m : d * float(int(code) - sc->offset);
        e[r * size_t(n) + size_t(j)] = src[int64_t(r) * n + j] - q;
        const float err = wr[j] - q;
        if (err != 0.0f && j + 1 < n) axpy_f32(wr + j + 1, uj + j + 1, -err, n - j - 1);
      }
    }
    for (size_t r = 0; r < k; r++) pack_codes(*sc, cb, u.data() + r * size_t(B), out + r * rb + size_t(b) * bb);
  }
  // ggml's plain quantization of each row, and its error, beside the feedback result's
  quantize_rows(t, src, n_rows, n, importance, plain.data());
  for (size_t r = 0; r < k; r++) {
    dequantize_row_ref(t, plain.data() + r * rb, n, w.data() + r * size_t(n));
    float* ep = e.data() + (k + r) * size_t(n);
    for (int64_t i = 0; i < n; i++) ep[i] = src[int64_t(r) * n + i] - w[r * size_t(n) + size_t(i)];
  }
  // ggml's row wins where its error is no larger: e_plain H e_plain - e_fed H e_fed <= 0
  weighted_error_differences(plan, e.data() + k * size_t(n), e.data(), int64_t(k), loss.data());
  int64_t kept_plain = 0;
  for (size_t r = 0; r < k; r++)
    if (loss[r] <= 0) {
      std::memcpy(out + r * rb, plain.data() + r * rb, rb);
      kept_plain++;
    }
  return kept_plain;
}

}  // namespace pe::cpu
