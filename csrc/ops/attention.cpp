#include "ops/attention.h"

#include <algorithm>
#include <cmath>

#include "ops/dispatch.h"

namespace pe {

int64_t attention_upload(Executor& ex, const KVCache& kv, int64_t n_rows, int n_head, const float* alibi) {
  PE_CHECK(n_head > 0 && n_head % kv.n_kv_head() == 0, Error, "attention: ", n_head,
           " query heads are not a multiple of the cache's ", kv.n_kv_head(), " KV heads");
  PE_CHECK(kv.device() == ex.device(), Error, "attention: cache on ", device_name(kv.device()), ", executor on ",
           device_name(ex.device()));
  PE_DISPATCH(ex, attention_upload, ex, kv, n_rows, n_head, alibi);
}

namespace {

void check_attention(Executor& ex, const Tensor& q, int n_head, const KVCache& kv, int layer, const AttentionRows& rows,
                     const Tensor& out, float softcap, const float* alibi, const PositionBias* bias) {
  PE_CHECK(softcap >= 0.f && softcap < 1e30f, Error, "attention: soft-cap ", softcap, " must be >= 0 and finite");
  for (int h = 0; alibi && h < n_head; h++)
    PE_CHECK(std::isfinite(alibi[h]), Error, "attention: ALiBi slope of head ", h, " is ", alibi[h]);
  const int64_t n = q.rows, width = int64_t(n_head) * kv.head_dim();
  PE_CHECK(n_head > 0 && n_head % kv.n_kv_head() == 0, Error, "attention: ", n_head,
           " query heads are not a multiple of the cache's ", kv.n_kv_head(), " KV heads");
  PE_CHECK(layer >= 0 && layer < kv.n_layer(), Error, "attention: layer ", layer, " out of range");
  PE_CHECK(kv.device() == ex.device(), Error, "attention: cache on ", device_name(kv.device()), ", executor on ",
           device_name(ex.device()));
  check_f32(ex, q, n, width, "attention: q");
  check_f32(ex, out, n, width, "attention: out");
  check_i32(ex, rows.seq, n, "attention: seq");
  check_i32(ex, rows.key_begin, n, "attention: key_begin");
  check_i32(ex, rows.key_end, n, "attention: key_end");
  if (bias) {
    PE_CHECK(bias->table && bias->n_buckets > 0 && bias->max_distance > 0, Error, "attention: empty position bias");
    PE_CHECK(ex.device() == Device::CPU, UnsupportedModelError,
             "attention: relative position biases (T5) run on the CPU only");
    check_i32(ex, bias->query_pos, n, "attention: query_pos");
  }
}

}  // namespace

void attention(Executor& ex, const Tensor& q, int n_head, const KVCache& kv, int layer, const AttentionRows& rows,
               float scale, const Tensor& out, float softcap, const float* alibi, const PositionBias* bias) {
  check_attention(ex, q, n_head, kv, layer, rows, out, softcap, alibi, bias);
  if (q.rows == 0) return;
  PE_DISPATCH(ex, attention, ex, q, n_head, kv, layer, rows, scale, out, softcap, alibi, bias);
}

void store_and_attend(Executor& ex, const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& slots, int n_head,
                      KVCache& kv, int layer, const AttentionRows& rows, float scale, const Tensor& out,
                      float softcap, const float* alibi, const PositionBias* bias) {
  PE_CHECK(k.rows == q.rows, Error, "attention: ", k.rows, " rows of keys for ", q.rows, " query rows");
  kv.check_store(ex, layer, k, v, slots);
  check_attention(ex, q, n_head, kv, layer, rows, out, softcap, alibi, bias);
  if (q.rows == 0) return;
  if (ex.device() == Device::CPU) {
    const NewKeys store{k, v, slots};
    cpu::attention(ex, q, n_head, kv, layer, rows, scale, out, softcap, alibi, bias, &store);
    return;
  }
  kv.store(ex, layer, k, v, slots);
  PE_DISPATCH(ex, attention, ex, q, n_head, kv, layer, rows, scale, out, softcap, alibi, bias);
}

int relative_position_bucket(int64_t rel, int n_buckets, int max_distance, bool bidirectional) {
  int bucket = 0;
  if (bidirectional) {
    n_buckets /= 2;
    if (rel > 0) bucket += n_buckets;
    rel = rel < 0 ? -rel : rel;
  } else {
    rel = rel < 0 ? -rel : 0;
  }
  const int max_exact = n_buckets / 2;
  if (rel < max_exact) return bucket + int(rel);
  // torch: float32 log of a float32 ratio, divided by a (double) Python constant, times an int, truncated
  const float ratio = float(rel) / float(max_exact);
  const float scaled = std::log(ratio) / float(std::log(double(max_distance) / double(max_exact))) *
                       float(n_buckets - max_exact);
  const int large = max_exact + int(scaled);
  return bucket + std::min(large, n_buckets - 1);
}

std::vector<float> alibi_slopes(int n_head, float max_bias) {
  PE_CHECK(n_head > 0 && std::isfinite(max_bias) && max_bias > 0, Error, "ALiBi: ", n_head, " heads, max bias ",
           max_bias);
  const int n = 1 << int(std::floor(std::log2(double(n_head))));
  const float m0 = std::pow(2.0f, -max_bias / float(n)), m1 = std::pow(2.0f, -max_bias / 2.0f / float(n));
  std::vector<float> slopes(static_cast<size_t>(n_head));
  for (int h = 0; h < n_head; h++)
    slopes[size_t(h)] = h < n ? std::pow(m0, float(h + 1)) : std::pow(m1, float(2 * (h - n) + 1));
  return slopes;
}

}  // namespace pe
