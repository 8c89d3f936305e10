// Test entry points for CUDA attention. The cuda_host_* functions run cuda/attention_math.cuh's
// arithmetic on the host in the order the kernels run it (splits of whole pages, a page-sized tile
// at a time, splits merged in order), so it is checked against numpy on machines without a GPU.
// cuda_attention_test runs the real op, through a KVCache, on the CPU or the CUDA backend.
#include <pybind11/numpy.h>
#include <pybind11/stl.h>

#include <algorithm>
#include <cstring>
#include <string>
#include <vector>

#include "bindings.h"
#include "common.h"
#include "cuda/attention_math.cuh"
#include "executor.h"
#include "kv_cache.h"
#include "ops/attention.h"

namespace py = pybind11;

namespace pe {

namespace {

using F32Array = py::array_t<float, py::array::c_style | py::array::forcecast>;
using I32Array = py::array_t<int32_t, py::array::c_style | py::array::forcecast>;

// One split's partial state, as the attention kernel leaves it in its workspace.
struct Partial {
  cuda::SoftmaxState st;
  std::vector<float> acc;
};

// Keys [lo, hi) of one head: a page-sized tile at a time (per_score: one key at a time); with an ALiBi
// slope, each score gets the bias of its distance from key `last`.
Partial host_split(const float* q, const float* k, const float* v, int hd, int64_t lo, int64_t hi, float scale,
                   bool per_score, const float* slope, int64_t last) {
  Partial part{cuda::softmax_empty(), std::vector<float>(size_t(hd), 0.0f)};
  std::vector<float> qs(static_cast<size_t>(hd)), p;
  for (int d = 0; d < hd; d++) qs[size_t(d)] = q[d] * scale;
  for (int64_t t0 = lo; t0 < hi;) {
    const int64_t t1 = per_score ? t0 + 1 : cuda::attention_tile_end(t0, hi);
    p.assign(size_t(t1 - t0), 0.0f);
    float tile_max = -INFINITY;
    for (int64_t j = t0; j < t1; j++) {
      float s = 0.0f;
      for (int d = 0; d < hd; d++) s += qs[size_t(d)] * k[j * hd + d];
      if (slope) s += cuda::alibi_bias(*slope, j, last);
      p[size_t(j - t0)] = s;
      tile_max = std::max(tile_max, s);
    }
    float alpha;
    if (per_score) {
      float w;
      cuda::softmax_push(part.st, p[0], &alpha, &w);
      p[0] = w;
    } else {
      alpha = cuda::softmax_raise_max(part.st, tile_max);
      float sum = 0.0f;
      for (float& s : p) {
        s = cuda::softmax_weight(s, part.st.m);
        sum += s;
      }
      part.st.l += sum;
    }
    for (int d = 0; d < hd; d++) {
      float a = part.acc[size_t(d)] * alpha;
      for (int64_t j = t0; j < t1; j++) a += p[size_t(j - t0)] * v[j * hd + d];
      part.acc[size_t(d)] = a;
    }
    t0 = t1;
  }
  return part;
}

py::array_t<float> cuda_host_attention(const F32Array& q, const F32Array& k, const F32Array& v, float scale,
                                       int n_split, int64_t key_begin, int64_t key_end, bool per_score,
                                       const std::vector<float>& alibi) {
  if (q.ndim() != 2 || k.ndim() != 3 || v.ndim() != 3)
    throw py::value_error("q must be (n_head, head_dim), k and v (n_kv_head, T, head_dim)");
  const int n_head = int(q.shape(0)), hd = int(q.shape(1)), n_kv = int(k.shape(0));
  const int64_t T = k.shape(1);
  if (k.shape(2) != hd || v.shape(0) != n_kv || v.shape(1) != T || v.shape(2) != hd)
    throw py::value_error("k and v must both be (n_kv_head, T, head_dim) with q's head_dim");
  if (n_kv < 1 || n_head % n_kv != 0) throw py::value_error("n_head must be a multiple of n_kv_head");
  if (n_split < 1) throw py::value_error("n_split must be >= 1");
  if (key_end < 0) key_end = T;
  if (key_begin < 0 || key_begin > key_end || key_end > T) throw py::value_error("bad key range");
  if (!alibi.empty() && int(alibi.size()) != n_head) throw py::value_error("alibi: one slope per query head");
  const int group = n_head / n_kv;

  py::array_t<float> out({n_head, hd});
  float* o = out.mutable_data();
  for (int h = 0; h < n_head; h++) {
    const int g = h / group;
    const float* qh = q.data() + int64_t(h) * hd;
    const float* kg = k.data() + int64_t(g) * T * hd;
    const float* vg = v.data() + int64_t(g) * T * hd;
    std::vector<Partial> parts;
    for (int s = 0; s < n_split; s++) {
      int64_t lo, hi;
      cuda::attention_split_range(key_begin, key_end, n_split, s, &lo, &hi);
      parts.push_back(host_split(qh, kg, vg, hd, lo, hi, scale, per_score, alibi.empty() ? nullptr : &alibi[size_t(h)],
                                 key_end - 1));
    }
    // One split: the kernel finishes its state itself; more: the merge kernel, splits in order.
    cuda::SoftmaxState st = parts[0].st;
    std::vector<float> acc = parts[0].acc;
    if (n_split > 1) {
      st = cuda::softmax_empty();
      std::fill(acc.begin(), acc.end(), 0.0f);
      for (const Partial& part : parts) {
        float wa, wb;
        cuda::softmax_merge(st, part.st, &wa, &wb);
        for (int d = 0; d < hd; d++) acc[size_t(d)] = acc[size_t(d)] * wa + part.acc[size_t(d)] * wb;
      }
    }
    const float inv = cuda::softmax_finish(st);
    for (int d = 0; d < hd; d++) o[int64_t(h) * hd + d] = acc[size_t(d)] * inv;
  }
  return out;
}

py::tuple cuda_host_softmax_merge(float m1, float l1, const F32Array& acc1, float m2, float l2, const F32Array& acc2) {
  if (acc1.ndim() != 1 || acc2.ndim() != 1 || acc1.shape(0) != acc2.shape(0))
    throw py::value_error("acc1 and acc2 must be vectors of one length");
  cuda::SoftmaxState st{m1, l1};
  float wa, wb;
  cuda::softmax_merge(st, cuda::SoftmaxState{m2, l2}, &wa, &wb);
  py::array_t<float> acc(acc1.shape(0));
  for (py::ssize_t i = 0; i < acc1.shape(0); i++) acc.mutable_data()[i] = acc1.data()[i] * wa + acc2.data()[i] * wb;
  return py::make_tuple(st.m, st.l, acc, cuda::softmax_finish(st));
}

// A device copy of host bytes; `keep` owns it.
void* upload(Executor& ex, const void* src, size_t bytes, std::vector<Buffer>& keep) {
  keep.emplace_back(ex.device(), std::max<size_t>(bytes, 4));
  copy_between(ex, ex.device(), keep.back().data(), Device::CPU, src, bytes);
  return keep.back().data();
}

Tensor i32_vector(void* data, int64_t n, Device d) {
  return Tensor{GGMLType::I32, data, 1, n, size_t(n) * sizeof(int32_t), d};
}

// The attention op on `device` over a cache holding sequence s's keys k_list[s] and values v_list[s]
// (each [len_s x n_kv_head * head_dim]), stored in layer 1 (layer 0 holds other values) with pages
// dealt out to the sequences in turn, so no sequence's pages are contiguous. q and out are column
// views of wider buffers (as in a fused QKV activation); columns of out outside the view must keep
// their contents. bad_slots: the store also gets two rows whose slots are outside the cache (the
// CUDA backend skips them; the CPU's throws).
py::array_t<float> cuda_attention_test(const std::string& device, const std::string& kv_type, const F32Array& q,
                                       int n_head, int n_kv_head, const std::vector<F32Array>& k_list,
                                       const std::vector<F32Array>& v_list, const I32Array& seq,
                                       const I32Array& key_begin, const I32Array& key_end, float scale,
                                       bool bad_slots, const std::vector<float>& alibi) {
  if (device != "cpu" && device != "cuda") throw py::value_error("device must be 'cpu' or 'cuda'");
  if (kv_type != "f16" && kv_type != "f32") throw py::value_error("kv_type must be 'f16' or 'f32'");
  if (q.ndim() != 2 || n_head < 1 || n_kv_head < 1 || q.shape(1) % n_head != 0)
    throw py::value_error("q must be (n, n_head * head_dim)");
  const int64_t n = q.shape(0), width = q.shape(1);
  const int hd = int(width / n_head);
  const int64_t kv_dim = int64_t(n_kv_head) * hd;
  const int n_seq = int(k_list.size());
  if (n_seq < 1 || v_list.size() != k_list.size()) throw py::value_error("k_list and v_list: one array per sequence");
  if (!alibi.empty() && int(alibi.size()) != n_head) throw py::value_error("alibi: one slope per query head");
  if (seq.size() != n || key_begin.size() != n || key_end.size() != n)
    throw py::value_error("seq, key_begin and key_end need one entry per row of q");
  int64_t longest = 1;
  for (int s = 0; s < n_seq; s++) {
    const F32Array &k = k_list[size_t(s)], &v = v_list[size_t(s)];
    if (k.ndim() != 2 || k.shape(1) != kv_dim || v.ndim() != 2 || v.shape(0) != k.shape(0) || v.shape(1) != kv_dim)
      throw py::value_error("k_list[s] and v_list[s] must be (len_s, n_kv_head * head_dim)");
    longest = std::max<int64_t>(longest, k.shape(0));
  }

  std::shared_ptr<Executor> exp = device == "cpu" ? Executor::cpu(1) : Executor::cuda();
  Executor& ex = *exp;
  const Device dev = ex.device();
  std::vector<Buffer> keep;
  // One spare sequence that stays empty, and room for a few pages more than needed.
  KVCache kv(ex, kv_type == "f16" ? GGMLType::F16 : GGMLType::F32, 2, n_kv_head, hd, n_seq + 1, longest + 130);

  // Extend the sequences in turns of 50 positions: pages of different sequences interleave.
  std::vector<int64_t> left(static_cast<size_t>(n_seq));
  for (int s = 0; s < n_seq; s++) left[size_t(s)] = k_list[size_t(s)].shape(0);
  for (bool more = true; more;) {
    more = false;
    for (int s = 0; s < n_seq; s++) {
      const int64_t step = std::min<int64_t>(50, left[size_t(s)]);
      if (step == 0) continue;
      kv.seq_extend(s, step);
      left[size_t(s)] -= step;
      more = true;
    }
  }

  // K and V of each sequence as columns of one fused row, [k | pad | v | pad], as a QKV activation.
  const int64_t ld = 2 * kv_dim + 6;
  for (int s = 0; s < n_seq; s++) {
    const int64_t len = k_list[size_t(s)].shape(0);
    if (len == 0) continue;
    const int64_t rows = len + (bad_slots ? 2 : 0);
    for (int layer = 0; layer < 2; layer++) {
      std::vector<float> fused(size_t(rows * ld), 0.0f);
      std::vector<int32_t> slots(static_cast<size_t>(rows));
      for (int64_t t = 0; t < len; t++) {
        for (int64_t c = 0; c < kv_dim; c++) {
          const float kx = k_list[size_t(s)].data()[t * kv_dim + c], vx = v_list[size_t(s)].data()[t * kv_dim + c];
          fused[size_t(t * ld + c)] = layer == 1 ? kx : -2.0f * vx;
          fused[size_t(t * ld + kv_dim + 3 + c)] = layer == 1 ? vx : 3.0f * kx;
        }
        slots[size_t(t)] = kv.slot(s, t);
      }
      if (bad_slots) {
        slots[size_t(len)] = -1;
        slots[size_t(len + 1)] = int32_t(kv.n_pages() * KVCache::kPageSize);
        for (int64_t c = 0; c < ld; c++) fused[size_t(len * ld + c)] = fused[size_t((len + 1) * ld + c)] = 1e4f;
      }
      auto* fd = static_cast<float*>(upload(ex, fused.data(), fused.size() * sizeof(float), keep));
      const Tensor all = f32_tensor(fd, rows, ld, ld, dev);
      const Tensor slot_t = i32_vector(upload(ex, slots.data(), slots.size() * sizeof(int32_t), keep), rows, dev);
      kv.store(ex, layer, all.cols_view(0, kv_dim), all.cols_view(kv_dim + 3, kv_dim), slot_t);
    }
  }

  // q at columns [5, 5 + width) of rows ld_q wide; out at columns [2, 2 + width) of rows ld_o wide.
  const int64_t ld_q = width + 9, ld_o = width + 4;
  const float kSentinel = 12345.0f;
  std::vector<float> qh(size_t(n * ld_q), 0.0f), oh(size_t(n * ld_o), kSentinel);
  for (int64_t r = 0; r < n; r++) std::memcpy(&qh[size_t(r * ld_q + 5)], q.data() + r * width, size_t(width) * 4);
  auto* qd = static_cast<float*>(upload(ex, qh.data(), qh.size() * sizeof(float), keep));
  auto* od = static_cast<float*>(upload(ex, oh.data(), oh.size() * sizeof(float), keep));
  const AttentionRows rows{i32_vector(upload(ex, seq.data(), size_t(n) * 4, keep), n, dev),
                           i32_vector(upload(ex, key_begin.data(), size_t(n) * 4, keep), n, dev),
                           i32_vector(upload(ex, key_end.data(), size_t(n) * 4, keep), n, dev)};
  attention(ex, f32_tensor(qd, n, ld_q, ld_q, dev).cols_view(5, width), n_head, kv, 1, rows, scale,
            f32_tensor(od, n, ld_o, ld_o, dev).cols_view(2, width), 0.f, alibi.empty() ? nullptr : alibi.data());
  copy_between(ex, Device::CPU, oh.data(), dev, od, oh.size() * sizeof(float));

  py::array_t<float> out({n, width});
  for (int64_t r = 0; r < n; r++) {
    for (int64_t c = 0; c < ld_o; c++) {
      const bool inside = c >= 2 && c < 2 + width;
      if (!inside && oh[size_t(r * ld_o + c)] != kSentinel)
        throw Error(str_cat("attention wrote row ", r, " column ", c - 2, ", outside its output view"));
    }
    std::memcpy(out.mutable_data() + r * width, &oh[size_t(r * ld_o + 2)], size_t(width) * 4);
  }
  return out;
}

}  // namespace

void bind_cuda_attention(py::module_& m) {
  m.def("cuda_host_attention", &cuda_host_attention, py::arg("q"), py::arg("k"), py::arg("v"), py::arg("scale"),
        py::arg("n_split") = 1, py::arg("key_begin") = 0, py::arg("key_end") = -1, py::arg("per_score") = false,
        py::arg("alibi") = std::vector<float>{},
        "CUDA attention's arithmetic on the host: q (n_head, head_dim) over keys [key_begin, key_end) of k and v "
        "(n_kv_head, T, head_dim), split in n_split runs of whole 64-position pages merged in order, a page at a "
        "time (per_score: a key at a time); alibi: one slope per head (ALiBi biases from key_end - 1). Returns "
        "(n_head, head_dim).");
  m.def("cuda_host_softmax_merge", &cuda_host_softmax_merge, py::arg("m1"), py::arg("l1"), py::arg("acc1"),
        py::arg("m2"), py::arg("l2"), py::arg("acc2"),
        "Merges partial softmax states (m, l, acc) as the split-K merge kernel does: returns (m, l, acc, 1 / l or 0).");
  m.def(
      "cuda_host_split_range",
      [](int64_t key_begin, int64_t key_end, int n_split, int split) {
        int64_t lo, hi;
        cuda::attention_split_range(key_begin, key_end, n_split, split, &lo, &hi);
        return py::make_tuple(lo, hi);
      },
      py::arg("key_begin"), py::arg("key_end"), py::arg("n_split"), py::arg("split"),
      "Keys (lo, hi) of one split of a row's key range, as the attention kernel deals them out.");
  m.def(
      "cuda_host_float_to_half_bits",
      [](const F32Array& x) {
        py::array_t<uint16_t> out(x.size());
        for (py::ssize_t i = 0; i < x.size(); i++) out.mutable_data()[i] = cuda::float_to_half_bits(x.data()[i]);
        return out;
      },
      py::arg("x"), "float32 -> IEEE half bits (round to nearest even), as attention_math.cuh converts them.");
  m.def(
      "cuda_host_half_bits_to_float",
      [](const py::array_t<uint16_t, py::array::c_style | py::array::forcecast>& x) {
        py::array_t<float> out(x.size());
        for (py::ssize_t i = 0; i < x.size(); i++) out.mutable_data()[i] = cuda::half_bits_to_float(x.data()[i]);
        return out;
      },
      py::arg("x"), "IEEE half bits -> float32, as attention_math.cuh converts them.");
  m.def("cuda_attention_test", &cuda_attention_test, py::arg("device"), py::arg("kv_type"), py::arg("q"),
        py::arg("n_head"), py::arg("n_kv_head"), py::arg("k_list"), py::arg("v_list"), py::arg("seq"),
        py::arg("key_begin"), py::arg("key_end"), py::arg("scale"), py::arg("bad_slots") = false,
        py::arg("alibi") = std::vector<float>{},
        "The attention op on device 'cpu' or 'cuda' over a paged cache holding k_list[s] / v_list[s] "
        "(len_s, n_kv_head * head_dim) as sequence s; q (n, n_head * head_dim); alibi: empty or one slope per "
        "query head. Returns (n, n_head * head_dim).");
  m.def("alibi_slopes", &alibi_slopes, py::arg("n_head"), py::arg("max_bias"),
        "ALiBi's per-head slopes for a maximum bias, as the model uses them (ops/attention.h).");
}

}  // namespace pe
