// Attention over the paged CPU KV cache. Query rows are cut into blocks of consecutive rows of one
// sequence (a prompt chunk, or one decode row); each (block, head) is one work item, run on one
// thread: for every cache page the block sees, scores = Q K_page^T, then a softmax over each row's
// visible keys, then out = sum over pages of P_page V_page. Each K and V page is read once per block
// and head, through the float matmul kernels' register tiles.
//
// Blocks hold at most kQueryBlock rows, below the row count from which the float kernels switch to
// their packed-panel algorithm (16 on AVX-512): every row's dot products are then summed in the same
// order whether the row is decoded alone or prefilled among others, so a sequence gets the same
// bits either way (8-bit activation rounding would otherwise amplify one-ulp differences).
#include <algorithm>
#include <cmath>
#include <vector>

#include "cpu/kv_layout.h"
#include "cpu/ops.h"

namespace pe::cpu {

namespace {

constexpr int64_t kQueryBlock = 8;  // query rows per work item; see the note in attention()

// p[0..n) = softmax(scale * s[0..n)), in place.
void softmax(float* s, int64_t n, float scale) {
  float mx = -INFINITY;
  for (int64_t j = 0; j < n; j++) mx = std::max(mx, s[j] * scale);
  double sum = 0;
  for (int64_t j = 0; j < n; j++) {
    s[j] = std::exp(s[j] * scale - mx);
    sum += s[j];
  }
  const float inv = float(1.0 / sum);
  for (int64_t j = 0; j < n; j++) s[j] *= inv;
}

struct Block {
  int64_t r0, r1;  // query rows
  int seq;
  int64_t k0, k1;  // keys any of its rows sees
};

}  // namespace

void attention(Executor& ex, const Tensor& q, int n_head, const KVCache& kv, int layer, const AttentionRows& rows,
               float scale, const Tensor& out) {
  const KVPageLayout lay(kv);
  const int hd = lay.head_dim, group = n_head / lay.n_kv_head;
  const int64_t P = KVCache::kPageSize;
  const auto* seq = static_cast<const int32_t*>(rows.seq.data);
  const auto* kb = static_cast<const int32_t*>(rows.key_begin.data);
  const auto* ke = static_cast<const int32_t*>(rows.key_end.data);

  std::vector<Block> blocks;
  for (int64_t r = 0; r < q.rows; r++) {
    PE_CHECK(seq[r] >= 0 && seq[r] < kv.n_seq_max(), Error, "attention: row ", r, " has sequence ", seq[r],
             " outside the cache");
    PE_CHECK(kb[r] >= 0 && kb[r] < ke[r] && ke[r] <= kv.seq_len(seq[r]), Error, "attention: row ", r, " sees keys [",
             kb[r], ", ", ke[r], ") of a sequence of ", kv.seq_len(seq[r]));
    if (blocks.empty() || blocks.back().seq != seq[r] || r - blocks.back().r0 == kQueryBlock)
      blocks.push_back(Block{r, r, seq[r], kb[r], ke[r]});
    Block& b = blocks.back();
    b.r1 = r + 1;
    b.k0 = std::min<int64_t>(b.k0, kb[r]);
    b.k1 = std::max<int64_t>(b.k1, ke[r]);
  }

  ex.pool().for_each_dynamic(int64_t(blocks.size()) * n_head, [&](int64_t item) {
    const Block& b = blocks[size_t(item / n_head)];
    const int h = int(item % n_head), g = h / group;
    const std::vector<int32_t>& pages = kv.pages(b.seq);
    const int64_t nb = b.r1 - b.r0;
    const int64_t first_page = b.k0 / P, last_page = (b.k1 - 1) / P;
    const int64_t base = first_page * P, width = b.k1 - base;  // scores cover keys [base, k1)
    thread_local std::vector<float> scores, partial;
    if (int64_t(scores.size()) < nb * width) scores.resize(size_t(nb * width));
    if (int64_t(partial.size()) < nb * hd) partial.resize(size_t(nb * hd));
    float* const sc = scores.data();

    const float* qb = q.row(b.r0) + int64_t(h) * hd;
    for (int64_t pg = first_page; pg <= last_page; pg++) {
      const int64_t n_keys = std::min(P, b.k1 - pg * P);
      uint8_t* page = kv.page_data(layer, pages[size_t(pg)]);
      matmul_float_serial(lay.keys_view(page, g, n_keys), qb, nb, q.ld(), sc + (pg * P - base), width);
    }
    for (int64_t t = 0; t < nb; t++) {
      float* s = sc + t * width;
      const int64_t lo = kb[b.r0 + t] - base, hi = ke[b.r0 + t] - base;
      std::fill(s, s + lo, 0.0f);
      softmax(s + lo, hi - lo, scale);
      std::fill(s + hi, s + width, 0.0f);
    }
    float* ob = out.row(b.r0) + int64_t(h) * hd;
    for (int64_t pg = first_page; pg <= last_page; pg++) {
      const int64_t n_keys = std::min(P, b.k1 - pg * P);
      uint8_t* page = kv.page_data(layer, pages[size_t(pg)]);
      const Tensor vt = lay.values_t_view(page, g, n_keys);
      if (pg == first_page) {
        matmul_float_serial(vt, sc + (pg * P - base), nb, width, ob, out.ld());
        continue;
      }
      matmul_float_serial(vt, sc + (pg * P - base), nb, width, partial.data(), hd);
      for (int64_t t = 0; t < nb; t++)
        for (int d = 0; d < hd; d++) ob[t * out.ld() + d] += partial[size_t(t * hd + d)];
    }
  });
}

}  // namespace pe::cpu
