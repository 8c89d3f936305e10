// Attention over the paged CUDA KV cache (page layout: cuda/kv_cache.cu), flash-decoding style.
//
// What is here: one kernel for every shape of batch. A block takes one query row, up to
// kMaxHeadsPerBlock query heads that share one KV head (grouped-query: each K and V element read
// serves all of them), and one split of the row's keys; it walks its keys a page at a time with an
// online softmax in fp32 (keys and values read as half or float), and writes either the finished
// output (one split) or a partial (m, l, acc) that a second kernel merges across splits. The splits
// (whole pages each, cuda/attention_math.cuh) are chosen on the host from the longest sequence in
// the cache, which bounds every row's key_end without reading the device's rows back: enough splits
// to fill the GPU when there are few rows (decode), one when there are many (prefill).
//
// What is left: prefill re-reads a sequence's K and V once per query row; a tensor-core
// flash-attention kernel that takes a tile of consecutive rows of one sequence per block is the
// next step. The page table is rebuilt on every call and uploaded when it changed (once per step:
// a pageable host-to-device copy can wait for the stream, so one per layer kept the host from
// queueing ahead of the GPU).
//
// Gemma 2's soft-cap and ALiBi's bias (slopes uploaded after the page table, distances from the row's
// last visible key, attention_math.cuh alibi_bias) are applied to each score before the softmax.
//
// The row metadata (seq, key_begin, key_end) lives on the device and is checked there: a row whose
// sequence is outside the cache, or whose range is empty once clamped to its sequence's length and
// pages, gets zeros. The host checks only what it can see without a sync.
#include <algorithm>
#include <cstring>
#include <vector>

#include "cuda/attention_math.cuh"
#include "cuda/common.cuh"
#include "cuda/ops.h"

namespace pe::cuda {

namespace {

constexpr int kThreads = 128;  // 4 warps
constexpr int kWarps = kThreads / 32;
constexpr int kMaxHeadsPerBlock = 8;
constexpr int kMaxHeadDim = 256;
constexpr int kPage = int(KVCache::kPageSize);
constexpr int kMaxSplits = 32;
constexpr int kBlocksPerSM = 4;
static_assert(KVCache::kPageSize == kAttnPageSize, "attention_math.cuh's page size");
static_assert(kPage <= 2 * 32, "the softmax step gives each lane at most two keys of a tile");

// The page table, as uploaded to workspace slot 0 (int32): seq_len[n_seq], first[n_seq + 1], then
// the page ids of sequence s at pages[first[s] .. first[s + 1]); after them, with ALiBi, the n_head
// slopes (float).
struct PageTable {
  const int32_t* seq_len;
  const int32_t* first;
  const int32_t* pages;
  int n_seq;
  const float* alibi;  // null without ALiBi
};

// Where K and V of one layer are, in the layout of cuda/kv_cache.cu.
struct CacheView {
  const uint8_t* layer_base;  // page_data(layer, 0)
  size_t page_bytes;          // K and V blocks of one page
  size_t v_offset;            // bytes from a page's K block to its V block
  int64_t n_pages;
  int n_kv_head, head_dim;
};

struct Rows {
  const int32_t* seq;
  const int32_t* key_begin;
  const int32_t* key_end;
};

__device__ __forceinline__ float warp_sum(float x) {
  for (int o = 16; o > 0; o >>= 1) x += __shfl_xor_sync(0xffffffffu, x, o);
  return x;
}

__device__ __forceinline__ float warp_max(float x) {
  for (int o = 16; o > 0; o >>= 1) x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, o));
  return x;
}

__device__ __forceinline__ float2 load_pair(const __half* p) { return __half22float2(*reinterpret_cast<const __half2*>(p)); }
__device__ __forceinline__ float2 load_pair(const float* p) { return *reinterpret_cast<const float2*>(p); }

// Keys [*lo, *hi) of row `row`'s split `split`, after clamping the row's range to its sequence;
// *lo == *hi when it sees none. Every thread of a block computes the same values (same loads).
__device__ void row_split_keys(const Rows& rows, const PageTable& pt, int64_t row, int n_split, int split,
                               int* seq_out, int64_t* lo, int64_t* hi) {
  *seq_out = -1;
  *lo = *hi = 0;
  const int seq = rows.seq[row];
  if (seq < 0 || seq >= pt.n_seq) return;
  const int64_t n_held = int64_t(pt.first[seq + 1] - pt.first[seq]) * kPage;
  int64_t kb = rows.key_begin[row], ke = rows.key_end[row];
  kb = kb < 0 ? 0 : kb;
  ke = ke < pt.seq_len[seq] ? ke : pt.seq_len[seq];
  ke = ke < n_held ? ke : n_held;
  if (kb >= ke) return;
  *seq_out = seq;
  attention_split_range(kb, ke, n_split, split, lo, hi);
}

// grid: x = query row, y = KV head * head chunks, z = split. Query heads h0 .. h0 + nh - 1 all read
// KV head g. With partial_ml == nullptr (one split) the block writes `out`; otherwise its partial
// (m, l) to partial_ml[(row * n_head + h) * n_split + split] and acc to partial_acc at that index
// times head_dim.
// The launch bounds say what the host's split count assumes (kBlocksPerSM blocks per SM); without
// the minimum, ptxas held the float-cache kernel to 64 registers on sm_80 and spilled.
template <typename T>
__global__ void __launch_bounds__(kThreads, kBlocksPerSM) attention_kernel(const float* q, int64_t ldq, int n_head, CacheView cv,
                                                             PageTable pt, Rows rows, float scale, float softcap,
                                                             int heads_per_block,
                                                             int n_chunks, int n_split, float* out, int64_t ldo,
                                                             float2* partial_ml, float* partial_acc) {
  __shared__ __align__(16) float q_s[kMaxHeadsPerBlock][kMaxHeadDim];    // q * scale
  __shared__ __align__(16) float acc_s[kMaxHeadsPerBlock][kMaxHeadDim];  // sum of p * v
  __shared__ float p_s[kMaxHeadsPerBlock][kPage];                        // scores, then weights, of a tile
  __shared__ SoftmaxState st_s[kMaxHeadsPerBlock];
  __shared__ float alpha_s[kMaxHeadsPerBlock];

  const int64_t row = blockIdx.x;
  const int g = int(blockIdx.y) / n_chunks, chunk = int(blockIdx.y) % n_chunks;
  const int group = n_head / cv.n_kv_head;
  const int h0 = g * group + chunk * heads_per_block;
  const int nh = min(heads_per_block, group - chunk * heads_per_block);  // >= 1: the host sizes chunks
  const int split = int(blockIdx.z);
  const int hd = cv.head_dim, n_pairs = hd / 2;
  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;

  for (int e = tid; e < nh * hd; e += kThreads) {
    const int h = e / hd, d = e % hd;
    q_s[h][d] = q[row * ldq + int64_t(h0 + h) * hd + d] * scale;
    acc_s[h][d] = 0.0f;
  }
  if (tid < nh) st_s[tid] = softmax_empty();

  int seq;
  int64_t lo, hi;
  row_split_keys(rows, pt, row, n_split, split, &seq, &lo, &hi);
  const int32_t* seq_pages = seq >= 0 ? pt.pages + pt.first[seq] : nullptr;
  const int64_t last = int64_t(rows.key_end[row]) - 1;  // ALiBi's distances are from this key
  __syncthreads();

  // Tiles are uniform across the block (lo, hi and the page ids are the same loads in every
  // thread), so every __syncthreads below is reached by all threads or by none.
  for (int64_t t0 = lo; t0 < hi; t0 = attention_tile_end(t0, hi)) {
    const int n = int(attention_tile_end(t0, hi) - t0);  // 1 .. kPage keys, all on one page
    const int32_t page = seq_pages[t0 / kPage];
    if (page < 0 || int64_t(page) >= cv.n_pages) continue;  // a bad page table entry: skip, never read it
    const uint8_t* base = cv.layer_base + size_t(page) * cv.page_bytes;
    // This tile's keys and values of KV head g: [n][hd], position-major.
    const T* kt = reinterpret_cast<const T*>(base) + (size_t(g) * kPage + size_t(t0 % kPage)) * size_t(hd);
    const T* vt = reinterpret_cast<const T*>(base + cv.v_offset) + (size_t(g) * kPage + size_t(t0 % kPage)) * size_t(hd);

    // Scores: a warp per key, lanes over pairs of dimensions, every head of the block at once.
    for (int j = warp; j < n; j += kWarps) {
      float dot[kMaxHeadsPerBlock];
#pragma unroll
      for (int h = 0; h < kMaxHeadsPerBlock; h++) dot[h] = 0.0f;
      const T* kj = kt + size_t(j) * size_t(hd);
      for (int dp = lane; dp < n_pairs; dp += 32) {
        const float2 kk = load_pair(kj + 2 * dp);
#pragma unroll
        for (int h = 0; h < kMaxHeadsPerBlock; h++) {
          if (h < nh) {
            const float2 qq = *reinterpret_cast<const float2*>(&q_s[h][2 * dp]);
            dot[h] = fmaf(qq.x, kk.x, fmaf(qq.y, kk.y, dot[h]));
          }
        }
      }
#pragma unroll
      for (int h = 0; h < kMaxHeadsPerBlock; h++) {
        if (h < nh) {  // nh is uniform: the whole warp shuffles
          const float s = warp_sum(dot[h]);
          if (lane == 0) {
            float x = softcap > 0.0f ? softcap * tanhf(s / softcap) : s;  // Gemma 2
            if (pt.alibi) x += alibi_bias(pt.alibi[h0 + h], t0 + j, last);
            p_s[h][j] = x;
          }
        }
      }
    }
    __syncthreads();

    // Softmax step: a warp per head; lanes hold keys lane and lane + 32 of the tile.
    for (int h = warp; h < nh; h += kWarps) {
      const float s0 = lane < n ? p_s[h][lane] : -INFINITY;
      const float s1 = lane + 32 < n ? p_s[h][lane + 32] : -INFINITY;
      SoftmaxState st = st_s[h];
      const float alpha = softmax_raise_max(st, warp_max(fmaxf(s0, s1)));
      const float p0 = lane < n ? softmax_weight(s0, st.m) : 0.0f;
      const float p1 = lane + 32 < n ? softmax_weight(s1, st.m) : 0.0f;
      if (lane < n) p_s[h][lane] = p0;
      if (lane + 32 < n) p_s[h][lane + 32] = p1;
      const float sum = warp_sum(p0 + p1);
      if (lane == 0) {
        st.l += sum;
        st_s[h] = st;
        alpha_s[h] = alpha;
      }
    }
    __syncthreads();

    // acc = acc * alpha + P V: a thread per (head, pair of dimensions); the heads of a pair read the
    // same values (L1 hits). Tried and measured slower on an H200 (7B shape, one head per block: 64
    // items for 128 threads): dealing a tile's keys to two thread groups whose sums meet in shared
    // memory, with the score and P V loops unrolled 4 / 8, took a decode call from 16.7 to 27.5 us and
    // prefill 2048 from 2,054 to 1,564 tok/s (benchmarks/results/gpu_bench_h200_attention_v2_rejected_*).
    for (int e = tid; e < nh * n_pairs; e += kThreads) {
      const int h = e / n_pairs, dp = e % n_pairs;
      float2 a = *reinterpret_cast<const float2*>(&acc_s[h][2 * dp]);
      const float alpha = alpha_s[h];
      a.x *= alpha;
      a.y *= alpha;
      for (int j = 0; j < n; j++) {
        const float p = p_s[h][j];
        const float2 vv = load_pair(vt + size_t(j) * size_t(hd) + 2 * dp);
        a.x = fmaf(p, vv.x, a.x);
        a.y = fmaf(p, vv.y, a.y);
      }
      *reinterpret_cast<float2*>(&acc_s[h][2 * dp]) = a;
    }
    __syncthreads();  // p_s, alpha_s and acc_s are rewritten by the next tile
  }

  // acc_s and st_s were last written before a barrier: the one ending the last tile read, or the one
  // before the tile loop when the block saw no keys.
  for (int e = tid; e < nh * hd; e += kThreads) {
    const int h = e / hd, d = e % hd;
    const SoftmaxState st = st_s[h];
    if (partial_ml == nullptr) {
      out[row * ldo + int64_t(h0 + h) * hd + d] = acc_s[h][d] * softmax_finish(st);
    } else {
      const int64_t pi = (row * n_head + h0 + h) * n_split + split;
      partial_acc[pi * hd + d] = acc_s[h][d];
      if (d == 0) partial_ml[pi] = make_float2(st.m, st.l);
    }
  }
}

// grid: x = query row, y = query head. Merges the n_split partials of (row, head) in split order,
// each thread for its own dimensions (the (m, l) merge is recomputed per thread: n_split is small).
__global__ void __launch_bounds__(kThreads) attention_merge_kernel(const float2* partial_ml, const float* partial_acc,
                                                                   int n_head, int head_dim, int n_split, float* out,
                                                                   int64_t ldo) {
  const int64_t row = blockIdx.x;
  const int h = int(blockIdx.y);
  const int64_t pi0 = (row * n_head + h) * n_split;
  for (int d = threadIdx.x; d < head_dim; d += blockDim.x) {
    SoftmaxState st = softmax_empty();
    float acc = 0.0f;
    for (int s = 0; s < n_split; s++) {
      const float2 ml = partial_ml[pi0 + s];
      float wa, wb;
      softmax_merge(st, SoftmaxState{ml.x, ml.y}, &wa, &wb);
      acc = acc * wa + partial_acc[(pi0 + s) * head_dim + d] * wb;
    }
    out[row * ldo + int64_t(h) * head_dim + d] = acc * softmax_finish(st);
  }
}

}  // namespace

namespace {

// What every attention of a pass shares: the page table (with the ALiBi slopes) in workspace slot 0 and
// the split count, which the host chooses from the longest sequence.
struct PassPlan {
  PageTable pt;
  int n_split;
  int n_chunks, heads_per_block;
};

PassPlan pass_plan(Executor& ex, const KVCache& kv, int64_t n_rows, int n_head, const float* alibi) {
  const int n_kv = kv.n_kv_head();
  const int group = n_head / n_kv;
  PassPlan plan;
  plan.n_chunks = int(ceil_div(group, kMaxHeadsPerBlock));
  plan.heads_per_block = int(ceil_div(group, plan.n_chunks));  // every chunk gets >= 1 head
  PE_CHECK(int64_t(n_kv) * plan.n_chunks <= 65535 && n_head <= 65535, UnsupportedModelError, "CUDA attention: ",
           n_head, " heads are too many for one launch");

  // Page table: the host knows the pages; the rows' sequences are on the device.
  const int n_seq = kv.n_seq_max();
  std::vector<int32_t> table(size_t(2 * n_seq + 1));
  int64_t max_len = 0;
  for (int s = 0; s < n_seq; s++) {
    table[size_t(s)] = int32_t(kv.seq_len(s));
    table[size_t(n_seq + s)] = int32_t(table.size() - size_t(2 * n_seq + 1));
    const std::vector<int32_t>& pages = kv.pages(s);
    table.insert(table.end(), pages.begin(), pages.end());
    max_len = std::max(max_len, kv.seq_len(s));
  }
  table[size_t(2 * n_seq)] = int32_t(table.size() - size_t(2 * n_seq + 1));
  const size_t alibi_at = table.size();
  if (alibi) {
    table.resize(alibi_at + size_t(n_head));
    std::memcpy(table.data() + alibi_at, alibi, size_t(n_head) * sizeof(float));
  }
  const size_t table_bytes = table.size() * sizeof(int32_t);
  // Every layer of a pass sends the same table: only the first one's copy is queued (attention_upload
  // queues it before the pass).
  auto* table_d = static_cast<int32_t*>(ex.upload_workspace(0, table.data(), table_bytes));
  plan.pt = PageTable{table_d, table_d + n_seq, table_d + 2 * n_seq + 1, n_seq,
                      alibi ? reinterpret_cast<const float*>(table_d + alibi_at) : nullptr};

  // Splits: enough blocks to keep kBlocksPerSM blocks on every SM (a block alone cannot keep enough
  // loads in flight), no more splits than the longest sequence has pages.
  const int64_t blocks = n_rows * n_kv * plan.n_chunks;
  const int64_t max_pages = std::max<int64_t>(1, ceil_div(max_len, KVCache::kPageSize));
  const int64_t want = ceil_div(kBlocksPerSM * int64_t(multiprocessor_count()), blocks);
  plan.n_split = int(std::clamp<int64_t>(want, 1, std::min<int64_t>(max_pages, kMaxSplits)));
  return plan;
}

}  // namespace

int64_t attention_upload(Executor& ex, const KVCache& kv, int64_t n_rows, int n_head, const float* alibi) {
  return pass_plan(ex, kv, n_rows, n_head, alibi).n_split;
}

void attention(Executor& ex, const Tensor& q, int n_head, const KVCache& kv, int layer, const AttentionRows& rows,
               float scale, const Tensor& out, float softcap, const float* alibi, const PositionBias* bias) {
  const int64_t n_rows = q.rows;
  if (n_rows == 0) return;
  PE_CHECK(!bias, UnsupportedModelError, "CUDA attention: relative position biases (T5) run on the CPU only");
  const int hd = kv.head_dim(), n_kv = kv.n_kv_head();
  PE_CHECK(hd % 2 == 0 && hd <= kMaxHeadDim, UnsupportedModelError, "CUDA attention: head_dim ", hd,
           " is not supported (it must be even and at most ", kMaxHeadDim, ")");
  PE_CHECK(n_rows <= INT32_MAX, Error, "CUDA attention: ", n_rows, " rows are too many for one launch");
  PE_CHECK(q.row_stride % sizeof(float) == 0 && out.row_stride % sizeof(float) == 0, Error,
           "CUDA attention: row strides must be whole floats");
  const PassPlan plan = pass_plan(ex, kv, n_rows, n_head, alibi);
  const PageTable& pt = plan.pt;
  const int n_split = plan.n_split, n_chunks = plan.n_chunks, heads_per_block = plan.heads_per_block;

  const size_t elem = kv.element_size();
  const size_t block_bytes = size_t(n_kv) * size_t(KVCache::kPageSize) * size_t(hd) * elem;
  PE_CHECK(size_t(kv.page_data(layer, 1) - kv.page_data(layer, 0)) == 2 * block_bytes, Error,
           "CUDA attention: the cache's page size disagrees with the CUDA page layout");
  const CacheView cv{kv.page_data(layer, 0), 2 * block_bytes, block_bytes, kv.n_pages(), n_kv, hd};
  const Rows r{static_cast<const int32_t*>(rows.seq.data), static_cast<const int32_t*>(rows.key_begin.data),
               static_cast<const int32_t*>(rows.key_end.data)};

  float2* partial_ml = nullptr;
  float* partial_acc = nullptr;
  if (n_split > 1) {
    const size_t n_partials = size_t(n_rows) * size_t(n_head) * size_t(n_split);
    auto* ws = static_cast<uint8_t*>(ex.workspace(1, n_partials * (sizeof(float2) + size_t(hd) * sizeof(float))));
    partial_ml = reinterpret_cast<float2*>(ws);
    partial_acc = reinterpret_cast<float*>(ws + n_partials * sizeof(float2));
  }

  const dim3 grid{unsigned(n_rows), unsigned(n_kv * n_chunks), unsigned(n_split)};
  const auto* qd = static_cast<const float*>(q.data);
  auto* od = static_cast<float*>(out.data);
  cudaStream_t stream = stream_of(ex);
  if (kv.type() == GGMLType::F16)
    attention_kernel<__half><<<grid, kThreads, 0, stream>>>(qd, q.ld(), n_head, cv, pt, r, scale, softcap, heads_per_block,
                                                            n_chunks, n_split, od, out.ld(), partial_ml, partial_acc);
  else
    attention_kernel<float><<<grid, kThreads, 0, stream>>>(qd, q.ld(), n_head, cv, pt, r, scale, softcap, heads_per_block,
                                                           n_chunks, n_split, od, out.ld(), partial_ml, partial_acc);
  PE_CUDA_LAUNCHED();
  if (n_split > 1) {
    const dim3 merge_grid{unsigned(n_rows), unsigned(n_head)};
    attention_merge_kernel<<<merge_grid, kThreads, 0, stream>>>(partial_ml, partial_acc, n_head, hd, n_split, od,
                                                                out.ld());
    PE_CUDA_LAUNCHED();
  }
}

}  // namespace pe::cuda
