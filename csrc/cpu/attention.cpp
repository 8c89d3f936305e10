// Attention over the paged CPU KV cache. Query rows are cut into blocks of consecutive rows of one
// sequence (a prompt chunk, or one decode row); each (block, head) is one work item, run on one
// thread: for every cache page the block sees, scores = Q K_page^T, then a softmax over each row's
// visible keys, then out = sum over pages of P_page V_page (attention_kernels.h). Each K and V page
// is read once per block and head. A row's sums run in the same order whatever its block, so a
// sequence gets the same bits decoded token by token or prefilled (8-bit activation rounding would
// otherwise amplify one-ulp differences).
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#define PE_ATTN_INLINE inline
#include "cpu/attention_simd.h"
#include "cpu/hadamard.h"
#include "cpu/kv_layout.h"
#include "cpu/ops.h"
#include "cpu_features.h"

namespace pe::cpu {

namespace {

constexpr int64_t kQueryBlock = kMaxQueryBlock;  // query rows per work item
// GCC deletes a loop whose only statements are prefetches (__builtin_prefetch or _mm_prefetch has no
// side effect to keep it), so on x86 the hint is an asm statement the optimiser must leave in place.
inline void prefetch_to_l2(const void* p) {
#if defined(PE_X86)
  asm volatile("prefetcht1 %0" : : "m"(*static_cast<const char*>(p)));
#else
  __builtin_prefetch(p, 0, 2);
#endif
}

// Asks for `used` bytes from the start of each of `rows` rows `stride` apart (rows start on a line).
inline void prefetch_rows(const uint8_t* p, int64_t rows, int64_t stride, int64_t used) {
  for (int64_t r = 0; r < rows; r++)
    for (int64_t o = 0; o < used; o += 64) prefetch_to_l2(p + r * stride + o);
}

// How many K/V blocks ahead an item asks for (each 8 KiB for 64-wide F16 heads). The pages of a sequence
// lie anywhere in the cache, and the hardware prefetchers only follow each block's first lines. Intel
// Xeon (model 167), SmolLM2 Q4_0, 2 threads, 8 sequences decoding at 600 keys: 505 -> 570 tok/s (0
// blocks ahead, i.e. asking for each block just before reading it, measured the same; 4 slightly slower;
// prefetcht0 no better); 1 sequence: 250 -> 279.
constexpr int64_t kPrefetchBlocks = 1;

// The portable kernels: attention_simd.h's loops with one float per "vector".
struct Scalar {
  using F = float;
  static constexpr int W = 1;
  static constexpr int kRegs = 16;  // vector registers
  static F zero() { return 0.f; }
  static F set1(float v) { return v; }
  static F fmadd(F a, F b, F c) { return a * b + c; }
  static F load_f32(const float* p, int) { return *p; }
  static F load_f16(const fp16_t* p, int) { return fp16_to_fp32(*p); }
  static F load_i8(const int8_t* p, int) { return float(*p); }
  static F set1_f16(fp16_t h) { return fp16_to_fp32(h); }
  static void store(float* p, F v, int) { *p = v; }
  static F add(F a, F b) { return a + b; }
  static F sub(F a, F b) { return a - b; }
  static F mul(F a, F b) { return a * b; }
  static F max(F a, F b) { return a > b ? a : b; }
  static F round(F a) { return std::nearbyint(a); }
  static F scale2(F a, F n) { return std::ldexp(a, int(n)); }
  static float hsum(F a) { return a; }
  static float hmax(F a) { return a; }
};

const AttentionKernels& kernels() {
#if defined(PE_X86)
  switch (cpu_path()) {
    case CpuPath::AMX:
    case CpuPath::AVX512: return kAvx512Attention;
    case CpuPath::AVX2: return kAvx2Attention;
    default: break;
  }
#endif
  return kPortableAttention;
}

// p[0..n) = softmax(x[0..n)) in place, x_j = scale * s_j: with softcap > 0 soft-capped first
// (softcap * tanh(x / softcap), Gemma 2); with an ALiBi slope, plus slope * (j - (n - 1)): s holds a
// row's visible keys, the last of them at the row's own position.
void softmax_row(const AttentionKernels& k, float* s, int64_t n, float scale, float softcap, float alibi_slope) {
  if (softcap > 0.f) {
    for (int64_t j = 0; j < n; j++) s[j] = softcap * std::tanh(s[j] * scale / softcap);
    scale = 1.f;
  }
  if (alibi_slope != 0.f) {
    for (int64_t j = 0; j < n; j++) s[j] = s[j] * scale + alibi_slope * float(j - (n - 1));
    scale = 1.f;
  }
  k.softmax(s, n, scale);
}

struct Block {
  int64_t r0, r1;  // query rows
  int seq;
  int64_t k0, k1;  // keys any of its rows sees
};

}  // namespace

const AttentionKernels kPortableAttention = {scores<Scalar>, values<Scalar>, softmax<Scalar>};

void attention_softmax(float* s, int64_t n, float scale) { kernels().softmax(s, n, scale); }

void attention(Executor& ex, const Tensor& q, int n_head, const KVCache& kv, int layer, const AttentionRows& rows,
               float scale, const Tensor& out, float softcap, const float* alibi, const PositionBias* bias,
               const NewKeys* store) {
  const KVPageLayout lay(kv);
  const AttentionKernels& k = kernels();
  const int hd = lay.head_dim, group = n_head / lay.n_kv_head;
  const int64_t P = KVCache::kPageSize;
  static_assert(KVCache::kPageSize % 64 == 0, "the scores kernels read K^T rows in whole chunks of up to 64 keys");
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

  // T5: the bias of each distance key - query over the distances this call spans, per head, so that the
  // inner loop is a table lookup (the bucket's two logs per score were a quarter of a long encode).
  std::vector<float> dist_bias;
  int64_t min_dist = 0, n_dist = 0;
  if (bias) {
    const auto* qpos = static_cast<const int32_t*>(bias->query_pos.data);
    int64_t kmin = INT64_MAX, kmax = INT64_MIN, qmin = INT64_MAX, qmax = INT64_MIN;
    for (int64_t r = 0; r < q.rows; r++) {
      kmin = std::min<int64_t>(kmin, kb[r]), kmax = std::max<int64_t>(kmax, ke[r] - 1);
      qmin = std::min<int64_t>(qmin, qpos[r]), qmax = std::max<int64_t>(qmax, qpos[r]);
    }
    min_dist = kmin - qmax, n_dist = kmax - qmin - min_dist + 1;
    PE_CHECK(n_dist > 0 && n_dist <= (int64_t(1) << 24), Error, "attention: query positions [", qmin, ", ", qmax,
             "] and keys [", kmin, ", ", kmax, "] span ", n_dist, " distances");
    dist_bias.resize(size_t(n_head * n_dist));
    for (int64_t i = 0; i < n_dist; i++) {
      const int bucket = relative_position_bucket(min_dist + i, bias->n_buckets, bias->max_distance, bias->bidirectional);
      for (int h = 0; h < n_head; h++) dist_bias[size_t(h * n_dist + i)] = bias->table[int64_t(h) * bias->n_buckets + bucket];
    }
  }

  // Decode (every block a single row) with grouped-query heads: a work item takes the `group` query heads
  // that share a KV head as the rows of one call, so their keys and values are read once, not `group`
  // times. Each score and output is the same sum in the same order either way (attention_kernels.h).
  bool fold = group > 1 && group <= kMaxQueryBlock;
  for (const Block& b : blocks) fold = fold && b.r1 - b.r0 == 1;
  const int heads_per_item = fold ? group : 1;
  const int64_t items_per_block = n_head / heads_per_item;

  // The rows' own keys and values (store_and_attend): where each sequence has one row and an item takes all
  // the query heads of its KV head, each item stores its row's keys of that head and then reads them, on
  // one thread (the store is head_dim scattered lines of K^T: stored by the caller alone, it was 8 % of a
  // SmolLM2 block's time at 8 sequences, Xeon model 167). Otherwise every row goes in first.
  bool store_in_items = false;
  const int32_t* store_slots = nullptr;
  if (store) {
    store_slots = static_cast<const int32_t*>(store->slots.data);
    // One row per sequence: a second row of a sequence would read the first one's keys, which another
    // item stores.
    std::vector<char> seen(size_t(kv.n_seq_max()), 0);
    bool one_row_each = true;
    for (const Block& b : blocks) {
      one_row_each = one_row_each && b.r1 - b.r0 == 1 && !seen[size_t(b.seq)];
      seen[size_t(b.seq)] = 1;
    }
    store_in_items = one_row_each && heads_per_item == group;
    if (store_in_items) check_kv_slots(kv, store->slots, q.rows);
    else store_kv_rows(kv, layer, store->k, store->v, store->slots);
  }

  // Items go head by head: a prefill's consecutive query blocks read the same keys and values (an
  // encoder's 256 rows x 12 heads: a few % faster than block by block; decode is unchanged).
  const int64_t n_blocks = int64_t(blocks.size());
  ex.pool().for_each_dynamic(n_blocks * items_per_block, [&](int64_t item) {
    const Block& b = blocks[size_t(item % n_blocks)];
    const int h0 = int(item / n_blocks) * heads_per_item, g = h0 / group;
    if (store_in_items) store_head_rows(lay, kv, layer, store->k, store->v, b.r0, 1, store_slots[b.r0], g);
    // The item's query rows: folded, heads h0.. of row b.r0 (hd apart); else rows b.r0.. of head h0.
    const int64_t nb = fold ? group : b.r1 - b.r0;
    const int64_t ldq = fold ? hd : q.ld(), ldo = fold ? hd : out.ld();
    auto row_of = [&](int64_t t) { return fold ? b.r0 : b.r0 + t; };
    auto head_of = [&](int64_t t) { return fold ? h0 + int(t) : h0; };
    const std::vector<int32_t>& pages = kv.pages(b.seq);
    const int64_t first_page = b.k0 / P, last_page = (b.k1 - 1) / P;
    const int64_t base = first_page * P, width = b.k1 - base;  // scores cover keys [base, k1)
    thread_local std::vector<float> scores;
    if (int64_t(scores.size()) < nb * width) scores.resize(size_t(nb * width));
    float* const sc = scores.data();

    // The item reads its K blocks, then its V blocks, each head_bytes long and one per page, from pages
    // scattered through the cache. Ask for block i + kPrefetchBlocks while computing block i.
    const int64_t n_pages = last_page - first_page + 1;
    auto block_addr = [&](int64_t i) {
      uint8_t* page = kv.page_data(layer, pages[size_t(first_page + i % n_pages)]);
      return i < n_pages ? lay.keys_t(page, g) : lay.values(page, g);
    };
    // Only the lines of the keys the item reads, [0, n) of each page: decode at short contexts ends in a
    // partly filled page, and whole blocks there were up to twice the traffic (Xeon model 167, SmolLM2
    // Q4_0, 2 threads, 8 sequences at 64-96 keys, median of 6: 800 -> 833 tok/s; at 600 keys unchanged).
    // Every line, not every other one (the adjacent-line prefetcher's pair): that was 11% slower.
    // Only for an item of one query row (decode): one of several rows (prefill) reads blocks that the
    // items before it read too, and asking again for lines already in the cache cost more than it saved
    // (T5-base encoder, 256 rows, one thread: the asking was 4 % of the pass; +2.7 % without).
    auto prefetch_block = [&](int64_t i) {
      if (i >= 2 * n_pages || b.r1 - b.r0 > 1) return;
      const uint8_t* p = block_addr(i);
      const int64_t n = std::min(P, b.k1 - (first_page + i % n_pages) * P), e = lay.elem_bytes();
      if (i < n_pages) {  // K^T: head_dim rows of P keys, then a Q8_0 cache's [head_dim / 32][P] scales
        prefetch_rows(p, hd, P * e, n * e);
        if (lay.elem == KVElem::Q8) prefetch_rows(p + hd * P, hd / kQ8Dims, P * 2, n * 2);
      } else {  // V: P rows of head_dim, then a Q8_0 cache's [P][head_dim / 32] scales
        prefetch_rows(p, 1, 0, n * hd * e);
        if (lay.elem == KVElem::Q8) prefetch_rows(p + hd * P, 1, 0, n * (hd / kQ8Dims) * 2);
      }
    };
    for (int64_t i = 0; i < kPrefetchBlocks; i++) prefetch_block(i);

    const float* qb = q.row(b.r0) + int64_t(h0) * hd;
    int64_t ldq_k = ldq;  // of the query rows the scores read
    if (const int rot = lay.key_rotation) {  // the cache holds H k: score H q against it
      thread_local std::vector<float> rotated;
      rotated.resize(size_t(nb * hd));
      for (int64_t t = 0; t < nb; t++) {
        std::copy(qb + t * ldq, qb + t * ldq + hd, rotated.begin() + t * hd);
        hadamard_rotate(rotated.data() + t * hd, hd, rot);
      }
      qb = rotated.data(), ldq_k = hd;
    }
    for (int64_t pg = first_page; pg <= last_page; pg++) {
      const int64_t n_keys = std::min(P, b.k1 - pg * P);
      uint8_t* page = kv.page_data(layer, pages[size_t(pg)]);
      prefetch_block(pg - first_page + kPrefetchBlocks);
      uint8_t* keys = lay.keys_t(page, g);
      k.scores(keys, lay.scales(keys), lay.elem, P, hd, int(n_keys), qb, ldq_k, int(nb), sc + (pg * P - base), width);
    }
    for (int64_t t = 0; t < nb; t++) {
      float* s = sc + t * width;
      const int64_t r = row_of(t);
      const int h = head_of(t);
      const int64_t lo = kb[r] - base, hi = ke[r] - base;
      std::fill(s, s + lo, 0.0f);
      float row_scale = scale;
      if (bias) {  // T5: scores plus the bias of each key's distance bucket (the scale applied first)
        const int64_t qpos = static_cast<const int32_t*>(bias->query_pos.data)[r];
        const float* by_dist = dist_bias.data() + h * n_dist;
        const int64_t off = base - qpos - min_dist;  // key base + j has its bias at by_dist[off + j]
        for (int64_t j = lo; j < hi; j++) s[j] = s[j] * scale + by_dist[off + j];
        row_scale = 1.f;
      }
      softmax_row(k, s + lo, hi - lo, row_scale, softcap, alibi ? alibi[h] : 0.f);
      std::fill(s + hi, s + width, 0.0f);
    }
    float* ob = out.row(b.r0) + int64_t(h0) * hd;
    for (int64_t t = 0; t < nb; t++) std::fill(ob + t * ldo, ob + t * ldo + hd, 0.0f);
    for (int64_t pg = first_page; pg <= last_page; pg++) {
      const int64_t n_keys = std::min(P, b.k1 - pg * P);
      uint8_t* page = kv.page_data(layer, pages[size_t(pg)]);
      prefetch_block(n_pages + pg - first_page + kPrefetchBlocks);
      uint8_t* values = lay.values(page, g);
      k.values(values, lay.scales(values), lay.elem, hd, int(n_keys), sc + (pg * P - base), width, int(nb), ob, ldo);
    }
    // The cache holds H v: the sum is H out, and H H = I.
    if (const int rot = lay.value_rotation)
      for (int64_t t = 0; t < nb; t++) hadamard_rotate(ob + t * ldo, hd, rot);
  });
}

}  // namespace pe::cpu
