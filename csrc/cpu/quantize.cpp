// ggml's quantizers, ported from ggml-quants.c (llama.cpp, MIT licence) with the same arithmetic in
// the same order, so that the bytes match. Names follow ggml's so that the two read side by side:
//   make_qx_quants   symmetric codes with a scale search (Q6_K/Q3_K sub-blocks, Q4_0 with weights)
//   make_q3_quants   Q3_K's reference sub-block search
//   make_qkx2/3_quants  codes with scale and min (Q2_K/Q4_K/Q5_K sub-blocks, Q4_1 with weights)
//   make_qp_quants   the 6-bit (or 4-bit) super-block scales of the sub-block scales, weighted
// Float evaluation order matters for byte-equality: this file is compiled without FMA (no -mfma), as
// is ggml's reference build that the tests compare against.
#include "cpu/quantize.h"

#include <algorithm>
#include <cassert>
#include <cmath>
#include <cstring>
#include <limits>
#include <type_traits>

#include "common.h"
#include "cpu/vec_clones.h"

namespace pe::cpu {

namespace {

constexpr float GROUP_MAX_EPS = 1e-15f;

// The scale searches are serial float chains; their PE_VEC_CLONES copies for AVX2 / AVX-512 machines run
// the same operations in the same order faster. Bytes are unchanged: every copy keeps the file's
// -ffp-contract=off.

// The searches below put their candidates in the lanes of VF8 / VI8, each lane doing one candidate's
// scalar operations. 8 lanes, not 16: the AVX2 copy of code on 16-lane types went through the stack for
// every scalar broadcast and compare (GCC's lowering where registers hold 8; see cpu/vec_clones.h) and
// ran 10x slower than the AVX-512 copy; 8 lanes also waste fewer on the 18 and up to 48 candidates.

// nearest_int of every lane.
__attribute__((always_inline)) inline VI8 nearest_int(VF8 fval) {
  const VF8 val = fval + 12582912.f;
  return ((VI8)val & 0x007fffff) - 0x00400000;
}

// Each lane of l clamped to [lo, hi].
__attribute__((always_inline)) inline VI8 clamp(VI8 l, VI8 lo, VI8 hi) {
  l = l > hi ? hi : l;
  return l < lo ? lo : l;
}

inline int nearest_int(float fval) {
  // round half to even through the float adder (ggml's trick; |fval| < 2^22)
  float val = fval + 12582912.f;
  int i;
  std::memcpy(&i, &val, sizeof(int));
  return (i & 0x007fffff) - 0x00400000;
}

inline float h2f(fp16_t h) { return fp16_to_fp32(h); }
inline fp16_t f2h(float f) { return fp32_to_fp16(f); }

PE_VEC_CLONES
float make_qx_quants(int n, int nmax, const float* x, int8_t* L, int rmse_type, const float* qw) {
  float max = 0, amax = 0;
  for (int i = 0; i < n; ++i) {
    float ax = std::fabs(x[i]);
    if (ax > amax) {
      amax = ax;
      max = x[i];
    }
  }
  if (amax < GROUP_MAX_EPS) {
    for (int i = 0; i < n; ++i) L[i] = 0;
    return 0.f;
  }
  float iscale = -nmax / max;
  if (rmse_type == 0) {
    for (int i = 0; i < n; ++i) {
      int l = nearest_int(iscale * x[i]);
      L[i] = int8_t(nmax + std::max(-nmax, std::min(nmax - 1, l)));
    }
    return 1 / iscale;
  }
  bool return_early = false;
  if (rmse_type < 0) {
    rmse_type = -rmse_type;
    return_early = true;
  }
  auto weight = [&](int i) {
    return qw ? qw[i]
              : rmse_type == 1 ? x[i] * x[i]
              : rmse_type == 2 ? 1.f
              : rmse_type == 3 ? std::fabs(x[i])
                               : std::sqrt(std::fabs(x[i]));
  };
  float sumlx = 0, suml2 = 0;
  for (int i = 0; i < n; ++i) {
    int l = nearest_int(iscale * x[i]);
    l = std::max(-nmax, std::min(nmax - 1, l));
    L[i] = int8_t(l + nmax);
    float w = weight(i);
    sumlx += w * x[i] * l;
    suml2 += w * l * l;
  }
  float scale = suml2 ? sumlx / suml2 : 0.0f;
  if (return_early) return suml2 > 0 ? 0.5f * (scale + 1 / iscale) : 1 / iscale;
  float best = scale * sumlx;
  // ggml tries 18 more scales, one after the other; each candidate's sums are a serial chain of float
  // additions (a few cycles each), so a block costs 18 * n chained adds. Here the candidates are the
  // lanes of three 8-float vectors: lane k accumulates candidate k with exactly ggml's operations in
  // ggml's order (no reassociation, no contraction: the file is built with -ffp-contract=off), so every
  // sum, and the choice, is bit for bit ggml's, while the 18 chains run side by side. Lanes 18..23 repeat
  // candidate 17 and are never read. Written with vector types because GCC left the plain loop over 18
  // candidates scalar (its clamp became branches); each clone lowers them to its own registers.
  constexpr int K = 18;
  constexpr int NV = (K + 7) / 8;
  float isc[8 * NV], slx[8 * NV], sl2[8 * NV];
  for (int k = 0; k < 8 * NV; ++k) {
    const int c = std::min(k, K - 1);
    const int is = c < 9 ? c - 9 : c - 8;  // -9..-1, 1..9
    isc[k] = -(nmax + 0.1f * is) / max;
  }
  VF8 visc[NV], vslx[NV] = {}, vsl2[NV] = {};
  std::memcpy(visc, isc, sizeof visc);
  const VI8 lo = VI8{} - nmax, hi = VI8{} + (nmax - 1);
  for (int i = 0; i < n; ++i) {
    const float xi = x[i], w = weight(i), wx = w * xi;
    for (int v = 0; v < NV; ++v) {
      const VI8 l = clamp(nearest_int(visc[v] * xi), lo, hi);
      const VF8 fl = __builtin_convertvector(l, VF8);
      vslx[v] += wx * fl;
      vsl2[v] += w * fl * fl;
    }
  }
  std::memcpy(slx, vslx, sizeof vslx);
  std::memcpy(sl2, vsl2, sizeof vsl2);
  int chosen = -1;
  for (int k = 0; k < K; ++k) {
    if (sl2[k] > 0 && slx[k] * slx[k] > best * sl2[k]) {
      scale = slx[k] / sl2[k];
      best = scale * slx[k];
      chosen = k;
    }
  }
  if (chosen >= 0) {
    for (int i = 0; i < n; ++i) {
      int l = nearest_int(isc[chosen] * x[i]);
      L[i] = int8_t(nmax + std::max(-nmax, std::min(nmax - 1, l)));
    }
  }
  return scale;
}

PE_VEC_CLONES
float make_q3_quants(int n, int nmax, const float* x, int8_t* L, bool do_rmse) {
  float max = 0, amax = 0;
  for (int i = 0; i < n; ++i) {
    float ax = std::fabs(x[i]);
    if (ax > amax) {
      amax = ax;
      max = x[i];
    }
  }
  if (amax < GROUP_MAX_EPS) {
    for (int i = 0; i < n; ++i) L[i] = 0;
    return 0.f;
  }
  float iscale = -nmax / max;
  if (do_rmse) {
    float sumlx = 0, suml2 = 0;
    for (int i = 0; i < n; ++i) {
      int l = nearest_int(iscale * x[i]);
      l = std::max(-nmax, std::min(nmax - 1, l));
      L[i] = int8_t(l);
      float w = x[i] * x[i];
      sumlx += w * x[i] * l;
      suml2 += w * l * l;
    }
    for (int itry = 0; itry < 5; ++itry) {
      int n_changed = 0;
      for (int i = 0; i < n; ++i) {
        float w = x[i] * x[i];
        float slx = sumlx - w * x[i] * L[i];
        if (slx > 0) {
          float sl2 = suml2 - w * L[i] * L[i];
          int new_l = nearest_int(x[i] * sl2 / slx);
          new_l = std::max(-nmax, std::min(nmax - 1, new_l));
          if (new_l != L[i]) {
            slx += w * x[i] * new_l;
            sl2 += w * new_l * new_l;
            if (sl2 > 0 && slx * slx * suml2 > sumlx * sumlx * sl2) {
              L[i] = int8_t(new_l);
              sumlx = slx;
              suml2 = sl2;
              ++n_changed;
            }
          }
        }
      }
      if (!n_changed) break;
    }
    for (int i = 0; i < n; ++i) L[i] = int8_t(L[i] + nmax);
    return suml2 > 0.0f ? sumlx / suml2 : 0.0f;
  }
  for (int i = 0; i < n; ++i) {
    int l = nearest_int(iscale * x[i]);
    l = std::max(-nmax, std::min(nmax - 1, l));
    L[i] = int8_t(l + nmax);
  }
  return 1 / iscale;
}

// make_qkx2_quants (weights given) and make_qkx3_quants (weights may be null: x^2) differ only in the
// degenerate test (max == min vs max <= min) and the default weights.
template <bool kx3>
__attribute__((always_inline)) inline float make_qkx_quants(int n, int nmax, const float* x, const float* weights, uint8_t* L, float* the_min,
                      float rmin, float rdelta, int nstep, bool use_mad) {
  auto wt = [&](int i) { return weights ? weights[i] : x[i] * x[i]; };
  float min = x[0], max = x[0];
  float sum_w = wt(0);
  float sum_x = sum_w * x[0];
  for (int i = 1; i < n; ++i) {
    if (x[i] < min) min = x[i];
    if (x[i] > max) max = x[i];
    float w = wt(i);
    sum_w += w;
    sum_x += w * x[i];
  }
  if (min > 0) min = 0;
  if (kx3 ? max <= min : max == min) {
    for (int i = 0; i < n; ++i) L[i] = 0;
    *the_min = -min;
    return 0.f;
  }
  float iscale = nmax / (max - min);
  float scale = 1 / iscale;
  float best_error = 0;
  for (int i = 0; i < n; ++i) {
    int l = nearest_int(iscale * (x[i] - min));
    L[i] = uint8_t(std::max(0, std::min(nmax, l)));
    float diff = scale * L[i] + min - x[i];
    diff = use_mad ? std::fabs(diff) : diff * diff;
    best_error += wt(i) * diff;
  }
  if (nstep < 1) {
    *the_min = -min;
    return scale;
  }
  // ggml tries nstep + 1 scales one after the other, and a candidate that lowers the error replaces
  // `min`, which the later candidates read. Here the candidates go in vector lanes (each lane ggml's
  // operations in ggml's order, so the sums and the choice are bit for bit ggml's): all the remaining
  // candidates are computed with the current min, then taken in order; when one is accepted and changes
  // min, the candidates after it are computed again with the new min.
  assert(n <= 32 && nstep < 48);
  VI8 laux[32][6];
  int start = 0;
  while (start <= nstep) {
    const int cnt = nstep + 1 - start, nv = (cnt + 7) / 8;
    float isc[48];
    for (int k = 0; k < 8 * nv; ++k) {
      const int is = start + std::min(k, cnt - 1);  // lanes past the last candidate repeat it (unread)
      isc[k] = (rmin + rdelta * is + nmax) / (max - min);
    }
    VF8 vis[6], sl[6] = {}, sl2[6] = {}, sxl[6] = {};
    std::memcpy(vis, isc, sizeof(VF8) * nv);
    const VI8 zero = VI8{}, top = VI8{} + nmax;
    for (int i = 0; i < n; ++i) {
      const float xi = x[i], w = wt(i), xm = x[i] - min;
      for (int v = 0; v < nv; ++v) {
        const VI8 l = clamp(nearest_int(vis[v] * xm), zero, top);
        laux[i][v] = l;
        const VF8 fl = __builtin_convertvector(l, VF8);
        sl[v] += w * fl;
        sl2[v] += w * fl * fl;
        sxl[v] += w * fl * xi;
      }
    }
    VF8 D[6], tscale[6], tmin[6], err[6];
    for (int v = 0; v < nv; ++v) {
      D[v] = sum_w * sl2[v] - sl[v] * sl[v];
      tscale[v] = (sum_w * sxl[v] - sum_x * sl[v]) / D[v];
      tmin[v] = (sl2[v] * sum_x - sl[v] * sxl[v]) / D[v];
      const VI8 pos = tmin[v] > 0;
      tmin[v] = pos ? VF8{} : tmin[v];
      tscale[v] = pos ? sxl[v] / sl2[v] : tscale[v];
      err[v] = VF8{};
    }
    for (int i = 0; i < n; ++i) {
      const float w = wt(i);
      for (int v = 0; v < nv; ++v) {
        VF8 diff = tscale[v] * __builtin_convertvector(laux[i][v], VF8) + tmin[v] - x[i];
        diff = use_mad ? (VF8)((VI8)diff & 0x7fffffff) : diff * diff;
        err[v] += w * diff;
      }
    }
    float fD[48], fscale[48], fmin[48], ferr[48];
    std::memcpy(fD, D, sizeof(VF8) * nv);
    std::memcpy(fscale, tscale, sizeof(VF8) * nv);
    std::memcpy(fmin, tmin, sizeof(VF8) * nv);
    std::memcpy(ferr, err, sizeof(VF8) * nv);
    int next = nstep + 1;
    for (int k = 0; k < cnt; ++k) {
      if (!(fD[k] > 0) || !(ferr[k] < best_error)) continue;
      for (int i = 0; i < n; ++i) L[i] = uint8_t(laux[i][k / 8][k % 8]);
      best_error = ferr[k];
      scale = fscale[k];
      const bool moved = std::memcmp(&min, &fmin[k], sizeof min) != 0;
      min = fmin[k];
      if (moved) {  // the later candidates read the old min: compute them again
        next = start + k + 1;
        break;
      }
    }
    start = next;
  }
  *the_min = -min;
  return scale;
}

PE_VEC_CLONES
float make_qp_quants(int n, int nmax, const float* x, uint8_t* L, const float* quant_weights) {
  float max = 0;
  for (int i = 0; i < n; ++i) max = std::max(max, x[i]);
  if (max < GROUP_MAX_EPS) {
    for (int i = 0; i < n; ++i) L[i] = 0;
    return 0.f;
  }
  float iscale = nmax / max;
  for (int i = 0; i < n; ++i) L[i] = uint8_t(nearest_int(iscale * x[i]));
  float scale = 1 / iscale;
  float best_mse = 0;
  for (int i = 0; i < n; ++i) {
    float diff = x[i] - scale * L[i];
    best_mse += quant_weights[i] * diff * diff;
  }
  for (int is = -4; is <= 4; ++is) {
    if (is == 0) continue;
    float iscale_is = (0.1f * is + nmax) / max;
    float scale_is = 1 / iscale_is;
    float mse = 0;
    for (int i = 0; i < n; ++i) {
      int l = std::min(nmax, nearest_int(iscale_is * x[i]));
      float diff = x[i] - scale_is * l;
      mse += quant_weights[i] * diff * diff;
    }
    if (mse < best_mse) {
      best_mse = mse;
      iscale = iscale_is;
    }
  }
  float sumlx = 0, suml2 = 0;
  for (int i = 0; i < n; ++i) {
    int l = std::min(nmax, nearest_int(iscale * x[i]));
    L[i] = uint8_t(l);
    float w = quant_weights[i];
    sumlx += w * x[i] * l;
    suml2 += w * l * l;
  }
  for (int itry = 0; itry < 5; ++itry) {
    int n_changed = 0;
    for (int i = 0; i < n; ++i) {
      float w = quant_weights[i];
      float slx = sumlx - w * x[i] * L[i];
      float sl2 = suml2 - w * L[i] * L[i];
      if (slx > 0 && sl2 > 0) {
        int new_l = std::min(nmax, nearest_int(x[i] * sl2 / slx));
        if (new_l != L[i]) {
          slx += w * x[i] * new_l;
          sl2 += w * new_l * new_l;
          if (slx * slx * suml2 > sumlx * sumlx * sl2) {
            L[i] = uint8_t(new_l);
            sumlx = slx;
            suml2 = sl2;
            ++n_changed;
          }
        }
      }
    }
    if (!n_changed) break;
  }
  return suml2 > 0.0f ? sumlx / suml2 : 0.0f;
}

inline void get_scale_min_k4(int j, const uint8_t* q, uint8_t* d, uint8_t* m) {
  if (j < 4) {
    *d = q[j] & 63;
    *m = q[j + 4] & 63;
  } else {
    *d = (q[j + 4] & 0xF) | ((q[j - 4] >> 6) << 4);
    *m = (q[j + 4] >> 4) | ((q[j - 0] >> 6) << 4);
  }
}

// Q4_K/Q5_K: eight 6-bit (scale, min) pairs in 12 bytes.
inline void pack_scale_min_k4(int j, uint8_t ls, uint8_t lm, uint8_t* scales) {
  if (j < 4) {
    scales[j] = ls;
    scales[j + 4] = lm;
  } else {
    scales[j + 4] = (ls & 0xF) | ((lm & 0xF) << 4);
    scales[j - 4] |= ((ls >> 4) << 6);
    scales[j - 0] |= ((lm >> 4) << 6);
  }
}

// --- 32-element types ----------------------------------------------------------------------------------

void quantize_row_q8_0(const float* x, block_q8_0* y, int64_t k) {
  for (int64_t i = 0; i < k / QK8_0; i++) quantize_block_q8_0(x + i * QK8_0, y[i].qs, 1, &y[i].d);
}

void quantize_row_q4_0_ref(const float* x, block_q4_0* y, int64_t k) {
  for (int64_t i = 0; i < k / QK4_0; i++) {
    float amax = 0.0f, max = 0.0f;
    for (int j = 0; j < QK4_0; j++) {
      const float v = x[i * QK4_0 + j];
      if (amax < std::fabs(v)) {
        amax = std::fabs(v);
        max = v;
      }
    }
    const float d = max / -8;
    const float id = d ? 1.0f / d : 0.0f;
    y[i].d = f2h(d);
    for (int j = 0; j < QK4_0 / 2; ++j) {
      const float x0 = x[i * QK4_0 + j] * id;
      const float x1 = x[i * QK4_0 + QK4_0 / 2 + j] * id;
      const uint8_t xi0 = std::min<int8_t>(15, int8_t(x0 + 8.5f));
      const uint8_t xi1 = std::min<int8_t>(15, int8_t(x1 + 8.5f));
      y[i].qs[j] = xi0 | (xi1 << 4);
    }
  }
}

void quantize_row_q4_1_ref(const float* x, block_q4_1* y, int64_t k) {
  for (int64_t i = 0; i < k / QK4_1; i++) {
    float min = std::numeric_limits<float>::max(), max = -std::numeric_limits<float>::max();
    for (int j = 0; j < QK4_1; j++) {
      const float v = x[i * QK4_1 + j];
      if (v < min) min = v;
      if (v > max) max = v;
    }
    const float d = (max - min) / ((1 << 4) - 1);
    const float id = d ? 1.0f / d : 0.0f;
    y[i].d = f2h(d);
    y[i].m = f2h(min);
    for (int j = 0; j < QK4_1 / 2; ++j) {
      const float x0 = (x[i * QK4_1 + j] - min) * id;
      const float x1 = (x[i * QK4_1 + QK4_1 / 2 + j] - min) * id;
      const uint8_t xi0 = std::min<int8_t>(15, int8_t(x0 + 0.5f));
      const uint8_t xi1 = std::min<int8_t>(15, int8_t(x1 + 0.5f));
      y[i].qs[j] = xi0 | (xi1 << 4);
    }
  }
}

void quantize_row_q4_0_impl(const float* x, block_q4_0* y, int64_t n_per_row, const float* quant_weights) {
  float weight[QK4_0];
  int8_t L[QK4_0];
  float sum_x2 = 0;
  for (int64_t j = 0; j < n_per_row; ++j) sum_x2 += x[j] * x[j];
  float sigma2 = sum_x2 / n_per_row;
  for (int64_t ib = 0; ib < n_per_row / QK4_0; ++ib) {
    const float* xb = x + QK4_0 * ib;
    const float* qw = quant_weights + QK4_0 * ib;
    for (int j = 0; j < QK4_0; ++j) weight[j] = qw[j] * std::sqrt(sigma2 + xb[j] * xb[j]);
    float d = make_qx_quants(QK4_0, 8, xb, L, 1, weight);
    y[ib].d = f2h(d);
    for (int j = 0; j < 16; ++j) y[ib].qs[j] = uint8_t(L[j] | (L[j + 16] << 4));
  }
}

PE_VEC_CLONES
void quantize_row_q4_1_impl(const float* x, block_q4_1* y, int64_t n_per_row, const float* quant_weights) {
  float weight[QK4_1];
  uint8_t L[QK4_1];
  float sum_x2 = 0;
  for (int64_t j = 0; j < n_per_row; ++j) sum_x2 += x[j] * x[j];
  float sigma2 = sum_x2 / n_per_row;
  for (int64_t ib = 0; ib < n_per_row / QK4_1; ++ib) {
    const float* xb = x + QK4_1 * ib;
    const float* qw = quant_weights + QK4_1 * ib;
    for (int j = 0; j < QK4_1; ++j) weight[j] = qw[j] * std::sqrt(sigma2 + xb[j] * xb[j]);
    float min;
    float d = make_qkx_quants<true>(QK4_1, 15, xb, weight, L, &min, -0.9f, 0.05f, 36, false);
    y[ib].d = f2h(d);
    y[ib].m = f2h(-min);
    for (int j = 0; j < 16; ++j) y[ib].qs[j] = uint8_t(L[j] | (L[j + 16] << 4));
  }
}

// Q5_0/Q5_1: the fifth bit of element j goes to bit j of qh (elements 16..31 to bits 16..31).
inline void pack_q5(const uint8_t* L, uint8_t* qs, uint8_t* qh_bytes) {
  uint32_t qh = 0;
  for (int j = 0; j < 16; ++j) {
    const uint8_t xi0 = L[j], xi1 = L[j + 16];
    qs[j] = uint8_t((xi0 & 0x0F) | ((xi1 & 0x0F) << 4));
    qh |= ((xi0 & 0x10u) >> 4) << (j + 0);
    qh |= ((xi1 & 0x10u) >> 4) << (j + 16);
  }
  std::memcpy(qh_bytes, &qh, sizeof(qh));
}

void quantize_row_q5_0_ref(const float* x, block_q5_0* y, int64_t k) {
  uint8_t L[QK5_0];
  for (int64_t i = 0; i < k / QK5_0; i++) {
    float amax = 0.0f, max = 0.0f;
    for (int j = 0; j < QK5_0; j++) {
      const float v = x[i * QK5_0 + j];
      if (amax < std::fabs(v)) {
        amax = std::fabs(v);
        max = v;
      }
    }
    const float d = max / -16;
    const float id = d ? 1.0f / d : 0.0f;
    y[i].d = f2h(d);
    for (int j = 0; j < QK5_0; ++j) L[j] = uint8_t(std::min<int8_t>(31, int8_t(x[i * QK5_0 + j] * id + 16.5f)));
    pack_q5(L, y[i].qs, y[i].qh);
  }
}

void quantize_row_q5_1_ref(const float* x, block_q5_1* y, int64_t k) {
  uint8_t L[QK5_1];
  for (int64_t i = 0; i < k / QK5_1; i++) {
    float min = std::numeric_limits<float>::max(), max = -std::numeric_limits<float>::max();
    for (int j = 0; j < QK5_1; j++) {
      const float v = x[i * QK5_1 + j];
      if (v < min) min = v;
      if (v > max) max = v;
    }
    const float d = (max - min) / ((1 << 5) - 1);
    const float id = d ? 1.0f / d : 0.0f;
    y[i].d = f2h(d);
    y[i].m = f2h(min);
    for (int j = 0; j < QK5_1; ++j) L[j] = uint8_t((x[i * QK5_1 + j] - min) * id + 0.5f);
    pack_q5(L, y[i].qs, y[i].qh);
  }
}

void quantize_row_q5_0_impl(const float* x, block_q5_0* y, int64_t n_per_row, const float* quant_weights) {
  float weight[QK5_0];
  int8_t L[QK5_0];
  float sum_x2 = 0;
  for (int64_t j = 0; j < n_per_row; ++j) sum_x2 += x[j] * x[j];
  float sigma2 = sum_x2 / n_per_row;
  for (int64_t ib = 0; ib < n_per_row / QK5_0; ++ib) {
    const float* xb = x + QK5_0 * ib;
    const float* qw = quant_weights + QK5_0 * ib;
    for (int j = 0; j < QK5_0; ++j) weight[j] = qw[j] * std::sqrt(sigma2 + xb[j] * xb[j]);
    float d = make_qx_quants(QK5_0, 16, xb, L, 1, weight);
    y[ib].d = f2h(d);
    pack_q5(reinterpret_cast<const uint8_t*>(L), y[ib].qs, y[ib].qh);
  }
}

PE_VEC_CLONES
void quantize_row_q5_1_impl(const float* x, block_q5_1* y, int64_t n_per_row, const float* quant_weights) {
  float weight[QK5_1];
  uint8_t L[QK5_1];
  float sum_x2 = 0;
  for (int64_t j = 0; j < n_per_row; ++j) sum_x2 += x[j] * x[j];
  float sigma2 = sum_x2 / n_per_row;
  for (int64_t ib = 0; ib < n_per_row / QK5_1; ++ib) {
    const float* xb = x + QK5_1 * ib;
    const float* qw = quant_weights + QK5_1 * ib;
    for (int j = 0; j < QK5_1; ++j) weight[j] = qw[j] * std::sqrt(sigma2 + xb[j] * xb[j]);
    float min;
    float d = make_qkx_quants<true>(QK5_1, 31, xb, weight, L, &min, -0.9f, 0.05f, 36, false);
    y[ib].d = f2h(d);
    y[ib].m = f2h(-min);
    pack_q5(L, y[ib].qs, y[ib].qh);
  }
}

// --- Q2_K ------------------------------------------------------------------------------------------------

void pack_q2_K(const uint8_t* L, block_q2_K* y) {
  for (int j = 0; j < QK_K; j += 128)
    for (int l = 0; l < 32; ++l)
      y->qs[j / 4 + l] = uint8_t(L[j + l] | (L[j + l + 32] << 2) | (L[j + l + 64] << 4) | (L[j + l + 96] << 6));
}

PE_VEC_CLONES
void quantize_row_q2_K_ref(const float* x, block_q2_K* y, int64_t k) {
  uint8_t L[QK_K];
  float weights[16], mins[QK_K / 16], scales[QK_K / 16];
  const float q4scale = 15.f;
  for (int64_t i = 0; i < k / QK_K; i++) {
    float max_scale = 0, max_min = 0;
    for (int j = 0; j < QK_K / 16; ++j) {
      for (int l = 0; l < 16; ++l) weights[l] = std::fabs(x[16 * j + l]);
      scales[j] = make_qkx_quants<false>(16, 3, x + 16 * j, weights, L + 16 * j, &mins[j], -0.5f, 0.1f, 15, true);
      max_scale = std::max(max_scale, scales[j]);
      max_min = std::max(max_min, mins[j]);
    }
    if (max_scale > 0) {
      float iscale = q4scale / max_scale;
      for (int j = 0; j < QK_K / 16; ++j) y[i].scales[j] = uint8_t(nearest_int(iscale * scales[j]));
      y[i].d = f2h(max_scale / q4scale);
    } else {
      for (int j = 0; j < QK_K / 16; ++j) y[i].scales[j] = 0;
      y[i].d = f2h(0.f);
    }
    if (max_min > 0) {
      float iscale = q4scale / max_min;
      for (int j = 0; j < QK_K / 16; ++j) y[i].scales[j] |= uint8_t(nearest_int(iscale * mins[j]) << 4);
      y[i].dmin = f2h(max_min / q4scale);
    } else {
      y[i].dmin = f2h(0.f);
    }
    for (int j = 0; j < QK_K / 16; ++j) {
      const float d = h2f(y[i].d) * (y[i].scales[j] & 0xF);
      if (!d) continue;
      const float dm = h2f(y[i].dmin) * (y[i].scales[j] >> 4);
      for (int ii = 0; ii < 16; ++ii) {
        int l = nearest_int((x[16 * j + ii] + dm) / d);
        L[16 * j + ii] = uint8_t(std::max(0, std::min(3, l)));
      }
    }
    pack_q2_K(L, &y[i]);
    x += QK_K;
  }
}

PE_VEC_CLONES
void quantize_row_q2_K_impl(const float* x, block_q2_K* y, int64_t k, const float* quant_weights) {
  uint8_t L[QK_K], Ls[QK_K / 16], Lm[QK_K / 16];
  float mins[QK_K / 16], scales[QK_K / 16], sw[QK_K / 16], weight[16];
  for (int64_t i = 0; i < k / QK_K; i++) {
    std::memset(sw, 0, sizeof(sw));
    float sumx2 = 0;
    for (int j = 0; j < QK_K; ++j) sumx2 += x[j] * x[j];
    float sigma2 = sumx2 / QK_K;
    for (int j = 0; j < QK_K / 16; ++j) {
      const float* qw = quant_weights + QK_K * i + 16 * j;
      for (int l = 0; l < 16; ++l) weight[l] = qw[l] * std::sqrt(sigma2 + x[16 * j + l] * x[16 * j + l]);
      for (int l = 0; l < QK_K / 16; ++l) sw[j] += weight[l];
      scales[j] = make_qkx_quants<true>(16, 3, x + 16 * j, weight, L + 16 * j, &mins[j], -0.9f, 0.05f, 36, false);
    }
    float dm = make_qp_quants(QK_K / 16, 15, scales, Ls, sw);
    float mm = make_qp_quants(QK_K / 16, 15, mins, Lm, sw);
    y[i].d = f2h(dm);
    y[i].dmin = f2h(mm);
    dm = h2f(y[i].d);
    mm = h2f(y[i].dmin);
    for (int j = 0; j < QK_K / 16; ++j) y[i].scales[j] = uint8_t(Ls[j] | (Lm[j] << 4));
    for (int j = 0; j < QK_K / 16; ++j) {
      const float d = dm * (y[i].scales[j] & 0xF);
      if (!d) continue;
      const float m = mm * (y[i].scales[j] >> 4);
      for (int ii = 0; ii < 16; ++ii) {
        int l = nearest_int((x[16 * j + ii] + m) / d);
        L[16 * j + ii] = uint8_t(std::max(0, std::min(3, l)));
      }
    }
    pack_q2_K(L, &y[i]);
    x += QK_K;
  }
}

// --- Q3_K ------------------------------------------------------------------------------------------------

// Codes L (0..7) -> hmask (high bit) and qs (low two bits).
void pack_q3_K(int8_t* L, block_q3_K* y) {
  std::memset(y->hmask, 0, QK_K / 8);
  int m = 0;
  uint8_t hm = 1;
  for (int j = 0; j < QK_K; ++j) {
    if (L[j] > 3) {
      y->hmask[m] |= hm;
      L[j] -= 4;
    }
    if (++m == QK_K / 8) {
      m = 0;
      hm <<= 1;
    }
  }
  for (int j = 0; j < QK_K; j += 128)
    for (int l = 0; l < 32; ++l)
      y->qs[j / 4 + l] = uint8_t(L[j + l] | (L[j + l + 32] << 2) | (L[j + l + 64] << 4) | (L[j + l + 96] << 6));
}

// Requantizes the 16-element sub-blocks with the stored 6-bit scales, as both ggml variants do.
void requantize_q3_K(const float* x, const block_q3_K* y, int8_t* L) {
  for (int j = 0; j < QK_K / 16; ++j) {
    int8_t sc = j < 8 ? y->scales[j] & 0xF : y->scales[j - 8] >> 4;
    sc = int8_t((sc | (((y->scales[8 + j % 4] >> (2 * (j / 4))) & 3) << 4)) - 32);
    float d = h2f(y->d) * sc;
    if (!d) continue;
    for (int ii = 0; ii < 16; ++ii) {
      int l = nearest_int(x[16 * j + ii] / d);
      L[16 * j + ii] = int8_t(std::max(-4, std::min(3, l)) + 4);
    }
  }
}

void set_scale_q3_K(int j, int l, uint8_t* scales) {
  if (j < 8) scales[j] = l & 0xF;
  else scales[j - 8] |= ((l & 0xF) << 4);
  l >>= 4;
  scales[j % 4 + 8] |= (l << (2 * (j / 4)));
}

void quantize_row_q3_K_ref(const float* x, block_q3_K* y, int64_t k) {
  int8_t L[QK_K];
  float scales[QK_K / 16];
  for (int64_t i = 0; i < k / QK_K; i++) {
    float max_scale = 0, amax = 0;
    for (int j = 0; j < QK_K / 16; ++j) {
      scales[j] = make_q3_quants(16, 4, x + 16 * j, L + 16 * j, true);
      float scale = std::fabs(scales[j]);
      if (scale > amax) {
        amax = scale;
        max_scale = scales[j];
      }
    }
    std::memset(y[i].scales, 0, 12);
    if (max_scale) {
      float iscale = -32.f / max_scale;
      for (int j = 0; j < QK_K / 16; ++j) {
        int8_t l = int8_t(nearest_int(iscale * scales[j]));
        l = int8_t(std::max<int>(-32, std::min<int>(31, l)) + 32);
        set_scale_q3_K(j, l, y[i].scales);
      }
      y[i].d = f2h(1 / iscale);
    } else {
      y[i].d = f2h(0.f);
    }
    requantize_q3_K(x, &y[i], L);
    pack_q3_K(L, &y[i]);
    x += QK_K;
  }
}

void quantize_row_q3_K_impl(const float* x, block_q3_K* y, int64_t n_per_row, const float* quant_weights) {
  int8_t L[QK_K], Ls[QK_K / 16];
  float scales[QK_K / 16], weight[16], sw[QK_K / 16];
  for (int64_t i = 0; i < n_per_row / QK_K; i++) {
    float sumx2 = 0;
    for (int j = 0; j < QK_K; ++j) sumx2 += x[j] * x[j];
    float sigma2 = 2 * sumx2 / QK_K;
    for (int j = 0; j < QK_K / 16; ++j) {
      if (quant_weights) {
        const float* qw = quant_weights + QK_K * i + 16 * j;
        for (int l = 0; l < 16; ++l) weight[l] = qw[l] * std::sqrt(sigma2 + x[16 * j + l] * x[16 * j + l]);
      } else {
        for (int l = 0; l < 16; ++l) weight[l] = x[16 * j + l] * x[16 * j + l];
      }
      float sumw = 0;
      for (int l = 0; l < 16; ++l) sumw += weight[l];
      sw[j] = sumw;
      scales[j] = make_qx_quants(16, 4, x + 16 * j, L + 16 * j, 1, weight);
    }
    std::memset(y[i].scales, 0, 12);
    float d_block = make_qx_quants(QK_K / 16, 32, scales, Ls, 1, sw);
    for (int j = 0; j < QK_K / 16; ++j) set_scale_q3_K(j, Ls[j], y[i].scales);
    y[i].d = f2h(d_block);
    requantize_q3_K(x, &y[i], L);
    pack_q3_K(L, &y[i]);
    x += QK_K;
  }
}

// --- Q4_K / Q5_K -------------------------------------------------------------------------------------------

// Requantizes the 32-element sub-blocks with the stored scales and mins; codes 0..nmax.
void requantize_k4(const float* x, const fp16_t d16, const fp16_t dmin16, const uint8_t* packed, int nmax,
                   uint8_t* L) {
  uint8_t sc, m;
  for (int j = 0; j < QK_K / 32; ++j) {
    get_scale_min_k4(j, packed, &sc, &m);
    const float d = h2f(d16) * sc;
    if (!d) continue;
    const float dm = h2f(dmin16) * m;
    for (int ii = 0; ii < 32; ++ii) {
      int l = nearest_int((x[32 * j + ii] + dm) / d);
      L[32 * j + ii] = uint8_t(std::max(0, std::min(nmax, l)));
    }
  }
}

// The reference (no importance) scale and min search shared by Q4_K (nmax 15) and Q5_K (nmax 31).
PE_VEC_CLONES
void ref_scales_k4(const float* x, int nmax, float rmin, int nstep, uint8_t* L, uint8_t* packed, fp16_t* d16,
                   fp16_t* dmin16) {
  float weights[32], mins[QK_K / 32], scales[QK_K / 32];
  float max_scale = 0, max_min = 0;
  for (int j = 0; j < QK_K / 32; ++j) {
    float sum_x2 = 0;
    for (int l = 0; l < 32; ++l) sum_x2 += x[32 * j + l] * x[32 * j + l];
    float av_x = std::sqrt(sum_x2 / 32);
    for (int l = 0; l < 32; ++l) weights[l] = av_x + std::fabs(x[32 * j + l]);
    scales[j] = make_qkx_quants<false>(32, nmax, x + 32 * j, weights, L + 32 * j, &mins[j], rmin, 0.1f, nstep, false);
    max_scale = std::max(max_scale, scales[j]);
    max_min = std::max(max_min, mins[j]);
  }
  float inv_scale = max_scale > 0 ? 63.f / max_scale : 0.f;
  float inv_min = max_min > 0 ? 63.f / max_min : 0.f;
  for (int j = 0; j < QK_K / 32; ++j) {
    uint8_t ls = uint8_t(nearest_int(inv_scale * scales[j]));
    uint8_t lm = uint8_t(nearest_int(inv_min * mins[j]));
    pack_scale_min_k4(j, std::min<uint8_t>(63, ls), std::min<uint8_t>(63, lm), packed);
  }
  *d16 = f2h(max_scale / 63.f);
  *dmin16 = f2h(max_min / 63.f);
}

// The importance-weighted search (quantize_row_q4_K_impl / q5_K_impl).
PE_VEC_CLONES
void impl_scales_k4(const float* x, int nmax, const float* qw_block, uint8_t* L, uint8_t* packed, fp16_t* d16,
                    fp16_t* dmin16) {
  uint8_t Ls[QK_K / 32], Lm[QK_K / 32];
  float weights[32], sw[QK_K / 32], mins[QK_K / 32], scales[QK_K / 32];
  float sum_x2 = 0;
  for (int l = 0; l < QK_K; ++l) sum_x2 += x[l] * x[l];
  float sigma2 = 2 * sum_x2 / QK_K;
  float av_x = std::sqrt(sigma2);
  for (int j = 0; j < QK_K / 32; ++j) {
    if (qw_block) {
      const float* qw = qw_block + 32 * j;
      for (int l = 0; l < 32; ++l) weights[l] = qw[l] * std::sqrt(sigma2 + x[32 * j + l] * x[32 * j + l]);
    } else {
      for (int l = 0; l < 32; ++l) weights[l] = av_x + std::fabs(x[32 * j + l]);
    }
    float sumw = 0;
    for (int l = 0; l < 32; ++l) sumw += weights[l];
    sw[j] = sumw;
    scales[j] = make_qkx_quants<true>(32, nmax, x + 32 * j, weights, L + 32 * j, &mins[j], -0.9f, 0.05f, 36, false);
  }
  float d_block = make_qp_quants(QK_K / 32, 63, scales, Ls, sw);
  float m_block = make_qp_quants(QK_K / 32, 63, mins, Lm, sw);
  for (int j = 0; j < QK_K / 32; ++j) {
    // Q4_K's impl stores Ls/Lm as they are, Q5_K's clamps to 63: make_qp_quants never exceeds nmax=63
    pack_scale_min_k4(j, std::min<uint8_t>(63, Ls[j]), std::min<uint8_t>(63, Lm[j]), packed);
  }
  *d16 = f2h(d_block);
  *dmin16 = f2h(m_block);
}

void pack_q4_K(const uint8_t* L, block_q4_K* y) {
  uint8_t* q = y->qs;
  for (int j = 0; j < QK_K; j += 64) {
    for (int l = 0; l < 32; ++l) q[l] = uint8_t(L[j + l] | (L[j + l + 32] << 4));
    q += 32;
  }
}

void pack_q5_K(const uint8_t* L, block_q5_K* y) {
  uint8_t* qh = y->qh;
  uint8_t* ql = y->qs;
  std::memset(qh, 0, QK_K / 8);
  uint8_t m1 = 1, m2 = 2;
  for (int n = 0; n < QK_K; n += 64) {
    for (int j = 0; j < 32; ++j) {
      int l1 = L[n + j];
      if (l1 > 15) {
        l1 -= 16;
        qh[j] |= m1;
      }
      int l2 = L[n + j + 32];
      if (l2 > 15) {
        l2 -= 16;
        qh[j] |= m2;
      }
      ql[j] = uint8_t(l1 | (l2 << 4));
    }
    m1 <<= 2;
    m2 <<= 2;
    ql += 32;
  }
}

template <typename Block>
void quantize_row_k4(const float* x, Block* y, int64_t n_per_row, const float* quant_weights, bool impl) {
  constexpr bool q5 = std::is_same_v<Block, block_q5_K>;
  constexpr int nmax = q5 ? 31 : 15;
  uint8_t L[QK_K];
  for (int64_t i = 0; i < n_per_row / QK_K; i++) {
    std::memset(y[i].scales, 0, K_SCALE_SIZE);
    if (impl)
      impl_scales_k4(x, nmax, quant_weights ? quant_weights + QK_K * i : nullptr, L, y[i].scales, &y[i].d, &y[i].dmin);
    else
      ref_scales_k4(x, nmax, q5 ? -0.5f : -1.f, q5 ? 15 : 20, L, y[i].scales, &y[i].d, &y[i].dmin);
    requantize_k4(x, y[i].d, y[i].dmin, y[i].scales, nmax, L);
    if constexpr (q5) pack_q5_K(L, &y[i]);
    else pack_q4_K(L, &y[i]);
    x += QK_K;
  }
}

// --- Q6_K --------------------------------------------------------------------------------------------------

void quantize_row_q6_K(const float* x, block_q6_K* y, int64_t n_per_row, const float* quant_weights) {
  int8_t L[QK_K];
  float scales[QK_K / 16];
  for (int64_t i = 0; i < n_per_row / QK_K; i++) {
    float max_scale = 0, max_abs_scale = 0;
    for (int ib = 0; ib < QK_K / 16; ++ib) {
      const float* qw = quant_weights ? quant_weights + QK_K * i + 16 * ib : nullptr;
      const float scale = make_qx_quants(16, 32, x + 16 * ib, L + 16 * ib, 1, qw);
      scales[ib] = scale;
      const float abs_scale = std::fabs(scale);
      if (abs_scale > max_abs_scale) {
        max_abs_scale = abs_scale;
        max_scale = scale;
      }
    }
    if (max_abs_scale < GROUP_MAX_EPS) {
      std::memset(&y[i], 0, sizeof(block_q6_K));
      y[i].d = f2h(0.f);
      x += QK_K;
      continue;
    }
    float iscale = -128.f / max_scale;
    y[i].d = f2h(1 / iscale);
    for (int ib = 0; ib < QK_K / 16; ++ib) y[i].scales[ib] = int8_t(std::min(127, nearest_int(iscale * scales[ib])));
    for (int j = 0; j < QK_K / 16; ++j) {
      float d = h2f(y[i].d) * y[i].scales[j];
      if (!d) continue;
      for (int ii = 0; ii < 16; ++ii) {
        int l = nearest_int(x[16 * j + ii] / d);
        L[16 * j + ii] = int8_t(std::max(-32, std::min(31, l)) + 32);
      }
    }
    uint8_t* ql = y[i].ql;
    uint8_t* qh = y[i].qh;
    for (int j = 0; j < QK_K; j += 128) {
      for (int l = 0; l < 32; ++l) {
        const uint8_t q1 = L[j + l + 0] & 0xF;
        const uint8_t q2 = L[j + l + 32] & 0xF;
        const uint8_t q3 = L[j + l + 64] & 0xF;
        const uint8_t q4 = L[j + l + 96] & 0xF;
        ql[l + 0] = uint8_t(q1 | (q3 << 4));
        ql[l + 32] = uint8_t(q2 | (q4 << 4));
        qh[l] = uint8_t((L[j + l] >> 4) | ((L[j + l + 32] >> 4) << 2) | ((L[j + l + 64] >> 4) << 4) |
                        ((L[j + l + 96] >> 4) << 6));
      }
      ql += 64;
      qh += 32;
    }
    x += QK_K;
  }
}

}  // namespace

void quantize_block_q8_0(const float* x, int8_t* q, int64_t q_stride, fp16_t* d_out) {
  float amax = 0.f;
  bool finite = true;
  for (int i = 0; i < QK8_0; i++) {
    amax = std::max(amax, std::fabs(x[i]));
    finite = finite && std::isfinite(x[i]);
  }
  const float d = amax / ((1 << 7) - 1), id = d != 0.f ? 1.f / d : 0.f;
  const bool tiny = !std::isfinite(id);  // a denormal d: 1 / d overflows, while x / d stays within +-127
  for (int i = 0; i < QK8_0; i++) {
    const float v = tiny ? x[i] / d : x[i] * id;
    q[i * q_stride] = finite ? int8_t(std::round(std::clamp(v, -127.f, 127.f))) : 0;
  }
  *d_out = f2h(finite ? d : std::numeric_limits<float>::quiet_NaN());
}

bool can_quantize(GGMLType t) {
  switch (t) {
    case GGMLType::Q8_0: case GGMLType::Q4_0: case GGMLType::Q4_1: case GGMLType::Q5_0: case GGMLType::Q5_1:
    case GGMLType::Q2_K:
    case GGMLType::Q3_K: case GGMLType::Q4_K: case GGMLType::Q5_K: case GGMLType::Q6_K:
      return true;
    default:
      return false;
  }
}

void quantize_rows(GGMLType t, const float* src, int64_t n_rows, int64_t n_per_row, const float* qw, void* dst) {
  const size_t rb = row_bytes(t, n_per_row);
  for (int64_t r = 0; r < n_rows; ++r) {
    const float* x = src + r * n_per_row;
    void* y = static_cast<uint8_t*>(dst) + size_t(r) * rb;
    switch (t) {
      case GGMLType::Q8_0: quantize_row_q8_0(x, static_cast<block_q8_0*>(y), n_per_row); break;
      case GGMLType::Q4_0:
        if (qw) quantize_row_q4_0_impl(x, static_cast<block_q4_0*>(y), n_per_row, qw);
        else quantize_row_q4_0_ref(x, static_cast<block_q4_0*>(y), n_per_row);
        break;
      case GGMLType::Q4_1:
        if (qw) quantize_row_q4_1_impl(x, static_cast<block_q4_1*>(y), n_per_row, qw);
        else quantize_row_q4_1_ref(x, static_cast<block_q4_1*>(y), n_per_row);
        break;
      case GGMLType::Q5_0:
        if (qw) quantize_row_q5_0_impl(x, static_cast<block_q5_0*>(y), n_per_row, qw);
        else quantize_row_q5_0_ref(x, static_cast<block_q5_0*>(y), n_per_row);
        break;
      case GGMLType::Q5_1:
        if (qw) quantize_row_q5_1_impl(x, static_cast<block_q5_1*>(y), n_per_row, qw);
        else quantize_row_q5_1_ref(x, static_cast<block_q5_1*>(y), n_per_row);
        break;
      case GGMLType::Q2_K:
        if (qw) quantize_row_q2_K_impl(x, static_cast<block_q2_K*>(y), n_per_row, qw);
        else quantize_row_q2_K_ref(x, static_cast<block_q2_K*>(y), n_per_row);
        break;
      case GGMLType::Q3_K:
        if (qw) quantize_row_q3_K_impl(x, static_cast<block_q3_K*>(y), n_per_row, qw);
        else quantize_row_q3_K_ref(x, static_cast<block_q3_K*>(y), n_per_row);
        break;
      case GGMLType::Q4_K: quantize_row_k4(x, static_cast<block_q4_K*>(y), n_per_row, qw, qw != nullptr); break;
      case GGMLType::Q5_K: quantize_row_k4(x, static_cast<block_q5_K*>(y), n_per_row, qw, qw != nullptr); break;
      case GGMLType::Q6_K: quantize_row_q6_K(x, static_cast<block_q6_K*>(y), n_per_row, qw); break;
      default:
        PE_CHECK(false, UnsupportedModelError, "cannot quantize to ", type_name(uint32_t(t)));
    }
  }
}

}  // namespace pe::cpu
