#include "ops/attention.h"

#include "ops/dispatch.h"

namespace pe {

void attention(Executor& ex, const Tensor& q, int n_head, const KVCache& kv, int layer, const AttentionRows& rows,
               float scale, const Tensor& out, float softcap) {
  PE_CHECK(softcap >= 0.f && softcap < 1e30f, Error, "attention: soft-cap ", softcap, " must be >= 0 and finite");
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
  if (n == 0) return;
  PE_DISPATCH(ex, attention, ex, q, n_head, kv, layer, rows, scale, out, softcap);
}

}  // namespace pe
