// top_logits on the GPU: one block per row. Passes over the row (from L2: the output layer has just
// written it): the maximum and its first index, with a check for NaN and infinities; the weight sum
// when asked; then radix rounds (cuda/top_logits_math.cuh) until the keys that can be among the k
// largest fit in shared memory; one ordered gather of them and a bitonic sort. Greedy rows (k = 1)
// stop after the first pass.
#include "cuda/common.cuh"
#include "cuda/ops.h"
#include "cuda/reduce.cuh"
#include "cuda/top_logits_math.cuh"

namespace pe::cuda {

namespace {

constexpr int kThreads = 1024;
constexpr int kWarps = kThreads / 32;

__device__ __forceinline__ uint64_t warp_max_u64(uint64_t v) {
  for (int o = 16; o > 0; o >>= 1) {
    const uint64_t other = __shfl_xor_sync(0xffffffffu, v, o);
    v = other > v ? other : v;
  }
  return v;
}

// Every thread gets the block's maximum; `scratch` holds kWarps values.
__device__ __forceinline__ uint64_t block_max_u64(uint64_t v, uint64_t* scratch) {
  v = warp_max_u64(v);
  __syncthreads();
  if (threadIdx.x % 32 == 0) scratch[threadIdx.x / 32] = v;
  __syncthreads();
  return warp_max_u64(threadIdx.x % 32 < kWarps ? scratch[threadIdx.x % 32] : 0);
}

// Writes the elements of x[0, n) whose keys pass `take`, as candidates in index order, to out[0, cap);
// returns how many passed (possibly more than cap). A tile of kThreads elements at a time: a ballot
// per warp orders each warp's elements, a scan of the warp counts orders the warps.
template <typename Take>
__device__ uint32_t ordered_gather(const float* x, int n, Take take, uint64_t* out, uint32_t cap, uint32_t* warp_off,
                                   uint32_t* base) {
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  if (threadIdx.x == 0) *base = 0;
  __syncthreads();
  for (int t0 = 0; t0 < n; t0 += kThreads) {
    const int i = t0 + int(threadIdx.x);
    const uint32_t key = i < n ? order_key(x[i]) : 0u;
    const bool in = i < n && take(key);
    const unsigned ballot = __ballot_sync(0xffffffffu, in);
    if (lane == 0) warp_off[warp] = __popc(ballot);
    __syncthreads();
    if (warp == 0) {  // exclusive scan of the warp counts; the tile's total in warp_off[kWarps]
      const uint32_t c = warp_off[lane];
      uint32_t incl = c;
      for (int o = 1; o < 32; o <<= 1) {
        const uint32_t v = __shfl_up_sync(0xffffffffu, incl, o);
        if (lane >= o) incl += v;
      }
      warp_off[lane] = incl - c;
      if (lane == 31) warp_off[kWarps] = incl;
    }
    __syncthreads();
    if (in) {
      const uint32_t pos = *base + warp_off[warp] + __popc(ballot & ((1u << lane) - 1u));
      if (pos < cap) out[pos] = top_candidate(key, uint32_t(i));
    }
    __syncthreads();
    if (threadIdx.x == 0) *base += warp_off[kWarps];
    __syncthreads();
  }
  const uint32_t total = *base;
  __syncthreads();  // every thread has read it before a next call resets it
  return total;
}

__global__ void __launch_bounds__(kThreads)
    top_logits_kernel(const float* __restrict__ logits, int64_t ldx, int n_cols, const int32_t* __restrict__ k,
                      const float* __restrict__ inv_t, int32_t* __restrict__ ids, int64_t ld_ids,
                      float* __restrict__ values, int64_t ld_values, float* __restrict__ stats, int64_t ld_stats) {
  __shared__ uint64_t cand[kTopCandidates];
  __shared__ uint32_t hist[256];
  __shared__ uint64_t scratch64[kWarps];
  __shared__ float scratch[kWarps];
  __shared__ uint32_t warp_off[kWarps + 1];
  __shared__ uint32_t base;
  __shared__ RadixState shared_state;
  const int r = blockIdx.x, tid = threadIdx.x, lane = tid % 32;
  const float* x = logits + int64_t(r) * ldx;
  int32_t* id = ids + int64_t(r) * ld_ids;
  float* val = values + int64_t(r) * ld_values;

  uint64_t best = 0;
  int bad = 0;
  for (int i = tid; i < n_cols; i += kThreads) {
    const float v = x[i];
    bad |= !isfinite(v);
    const uint64_t c = top_candidate(order_key(v), uint32_t(i));
    best = c > best ? c : best;
  }
  bad = __syncthreads_or(bad);
  if (bad) {
    if (tid == 0) stats[int64_t(r) * ld_stats] = 0.f, stats[int64_t(r) * ld_stats + 1] = 1.f;
    return;
  }
  best = block_max_u64(best, scratch64);
  const float top = order_key_value(top_candidate_key(best));
  const float it = inv_t[r];
  float sum = 0.f;
  if (it > 0.f) {
    for (int i = tid; i < n_cols; i += kThreads) {
      const float t = (x[i] - top) * it;
      sum += t >= -87.3f ? expf(t) : 0.f;  // the CPU's cut: weights below e^-87.3 count as 0
    }
    sum = block_sum<kThreads>(sum, scratch);
  }
  if (tid == 0) stats[int64_t(r) * ld_stats] = sum, stats[int64_t(r) * ld_stats + 1] = 0.f;
  const uint32_t kr = uint32_t(k[r]);
  if (kr == 1) {
    if (tid == 0) id[0] = int32_t(top_candidate_index(best)), val[0] = top;
    return;
  }

  RadixState st = radix_start(kr);
  for (int shift = 24; shift >= 0; shift -= 8) {
    for (int i = tid; i < 256; i += kThreads) hist[i] = 0;
    __syncthreads();
    // Warp-aggregated counts: the top bytes of a row's keys fall in a few bins, and one atomic per
    // distinct digit per warp keeps them from serialising.
    for (int t0 = 0; t0 < n_cols; t0 += kThreads) {
      const int i = t0 + tid;
      const uint32_t key = i < n_cols ? order_key(x[i]) : 0u;
      const int digit = i < n_cols && radix_matches(key, st) ? radix_digit(key, shift) : -1;
      const unsigned peers = __match_any_sync(0xffffffffu, digit);
      if (digit >= 0 && __ffs(peers) - 1 == lane) atomicAdd(&hist[digit], uint32_t(__popc(peers)));
    }
    __syncthreads();
    if (tid == 0) {
      radix_pick(hist, shift, st);
      shared_state = st;
    }
    __syncthreads();
    st = shared_state;
    if (st.above + st.bin_count <= uint32_t(kTopCandidates)) break;
  }

  uint32_t n_cand = ordered_gather(x, n_cols, [&](uint32_t key) { return radix_candidate(key, st); }, cand,
                                   kTopCandidates, warp_off, &base);
  if (n_cand > uint32_t(kTopCandidates)) {
    // Only after the last round (the prefix is then the k-th key itself), when more keys than fit
    // equal it: the greater ones (fewer than k), then the equal ones in index order up to k.
    const uint32_t kth = st.prefix;
    const uint32_t greater = ordered_gather(x, n_cols, [&](uint32_t key) { return key > kth; }, cand,
                                            kTopCandidates, warp_off, &base);
    ordered_gather(x, n_cols, [&](uint32_t key) { return key == kth; }, cand + greater, kr - greater, warp_off,
                   &base);
    n_cand = kr;
  }
  int n_sort = 2;
  while (n_sort < int(n_cand)) n_sort <<= 1;
  for (int i = int(n_cand) + tid; i < n_sort; i += kThreads) cand[i] = 0;
  __syncthreads();
  // Bitonic sort, descending.
  for (int size = 2; size <= n_sort; size <<= 1) {
    for (int stride = size / 2; stride > 0; stride >>= 1) {
      for (int p = tid; p < n_sort / 2; p += kThreads) {
        const int lo = 2 * p - (p & (stride - 1)), hi = lo + stride;
        const bool descending = (lo & size) == 0;
        const uint64_t a = cand[lo], b = cand[hi];
        if ((a < b) == descending) cand[lo] = b, cand[hi] = a;
      }
      __syncthreads();
    }
  }
  for (int j = tid; j < int(kr); j += kThreads) {
    id[j] = int32_t(top_candidate_index(cand[j]));
    val[j] = order_key_value(top_candidate_key(cand[j]));
  }
}

}  // namespace

void top_logits(Executor& ex, const Tensor& logits, const Tensor& k, const Tensor& inv_t, const Tensor& ids,
                const Tensor& values, const Tensor& stats) {
  PE_CHECK(logits.rows <= 0x7fffffff && logits.cols <= 0x7fffffff, Error, "top_logits: ", logits.rows, " x ",
           logits.cols, " logits are too many for one grid");
  top_logits_kernel<<<unsigned(logits.rows), kThreads, 0, stream_of(ex)>>>(
      logits.row(0), logits.ld(), int(logits.cols), static_cast<const int32_t*>(k.data), inv_t.row(0),
      static_cast<int32_t*>(ids.data), int64_t(ids.row_stride / sizeof(int32_t)), values.row(0), values.ld(),
      stats.row(0), stats.ld());
  PE_CUDA_LAUNCHED();
}

}  // namespace pe::cuda
