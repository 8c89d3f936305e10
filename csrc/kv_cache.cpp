#include "kv_cache.h"

#include <algorithm>
#include <cstring>

#include "ops/dispatch.h"

namespace pe {

int64_t kv_pages_per_seq(int64_t positions, int64_t window, int64_t n_batch) {
  const int64_t P = KVCache::kPageSize, all = (positions + P - 1) / P;
  if (window <= 0) return all;
  // A pass's first row at position p sees keys from p + 1 - window; its last row is p + n_batch - 1. Those
  // window - 1 + n_batch positions start anywhere in a page, so one more page than they fill.
  return std::min(all, (window - 1 + n_batch + P - 1) / P + 1);
}

size_t KVCache::head_page_bytes(GGMLType type, int64_t head_dim) {
  const size_t n = size_t(head_dim) * size_t(kPageSize);
  switch (type) {
    case GGMLType::F32: return 4 * n;
    case GGMLType::Q8_0: return n + sizeof(fp16_t) * (n / kQ8Block);
    default: return 2 * n;
  }
}

KVCache::KVCache(Executor& ex, GGMLType type, int n_layer, int n_kv_head, int head_dim, int n_seq_max, int64_t n_ctx,
                 int64_t pages_per_seq)
    : type_(type), n_layer_(n_layer), n_kv_head_(n_kv_head), head_dim_(head_dim), n_ctx_(n_ctx) {
  PE_CHECK(type == GGMLType::F16 || type == GGMLType::F32 || type == GGMLType::Q8_0, Error,
           "KV cache type must be f16, f32 or q8_0");
  PE_CHECK(type != GGMLType::Q8_0 || head_dim % kQ8Block == 0, Error, "a q8_0 KV cache needs a head size that is a "
           "multiple of ", kQ8Block, "; this model's is ", head_dim, " (use kv_type f16)");
  PE_CHECK(type != GGMLType::Q8_0 || ex.device() == Device::CPU, Error, "a q8_0 KV cache runs on the CPU only: "
           "use kv_type f16 with n_gpu_layers");
  PE_CHECK(n_seq_max >= 1 && n_seq_max <= 4096, Error, "n_seq_max must be in [1, 4096], not ", n_seq_max);
  PE_CHECK(n_ctx > 0 && n_ctx <= (int64_t(1) << 24), Error, "n_ctx must be in [1, 16M], not ", n_ctx);
  const int64_t all_pages = (n_ctx + kPageSize - 1) / kPageSize;
  PE_CHECK(pages_per_seq >= 0 && pages_per_seq <= all_pages, Error, "KV cache: ", pages_per_seq,
           " pages per sequence for ", n_ctx, " positions");
  n_pages_ = (pages_per_seq ? pages_per_seq : all_pages) * n_seq_max;
  PE_CHECK(n_pages_ <= INT32_MAX / kPageSize, Error, "KV cache too large: ", n_seq_max, " sequences x ", n_ctx,
           " positions");
  page_bytes_ = 2 * size_t(n_kv_head) * head_page_bytes(type, head_dim);
  storage_ = Buffer(ex.device(), page_bytes_ * size_t(n_pages_) * size_t(n_layer));
  storage_.zero();  // touch it now: the memory a context needs shows at once, not as it fills
  seq_pages_.resize(size_t(n_seq_max));
  seq_len_.assign(size_t(n_seq_max), 0);
  refs_.assign(size_t(n_pages_), 0);
  clear();
}

void KVCache::check_seq(int seq, const char* what) const {
  PE_CHECK(seq >= 0 && seq < n_seq_max(), Error, what, ": sequence id ", seq, " is out of range [0, ", n_seq_max(),
           ")");
}

int64_t KVCache::seq_len(int seq) const {
  check_seq(seq, "seq_len");
  return seq_len_[size_t(seq)];
}

const std::vector<int32_t>& KVCache::pages(int seq) const {
  check_seq(seq, "pages");
  return seq_pages_[size_t(seq)];
}

int64_t KVCache::seq_first(int seq) const {
  check_seq(seq, "seq_first");
  const auto& pages = seq_pages_[size_t(seq)];
  size_t i = 0;
  while (i < pages.size() && pages[i] == kReleased) i++;
  return int64_t(i) * kPageSize;
}

void KVCache::seq_release_before(int seq, int64_t pos) {
  check_seq(seq, "seq_release_before");
  auto& pages = seq_pages_[size_t(seq)];
  // Never the page holding the last position: the sequence keeps at least that.
  const int64_t end = std::min<int64_t>(pos / kPageSize, (seq_len_[size_t(seq)] - 1) / kPageSize);
  for (int64_t i = 0; i < end; i++) {
    if (pages[size_t(i)] == kReleased) continue;
    release_page(pages[size_t(i)]);
    pages[size_t(i)] = kReleased;
  }
}

void KVCache::clear() {
  for (auto& p : seq_pages_) p.clear();
  seq_len_.assign(seq_len_.size(), 0);
  refs_.assign(refs_.size(), 0);
  free_.clear();
  for (int64_t p = n_pages_ - 1; p >= 0; p--) free_.push_back(int32_t(p));
}

int32_t KVCache::alloc_page() {
  PE_CHECK(!free_.empty(), ContextLengthError, "KV cache full: all ", n_pages_, " pages of ", kPageSize,
           " positions are in use");
  const int32_t p = free_.back();
  free_.pop_back();
  refs_[size_t(p)] = 1;
  return p;
}

void KVCache::release_page(int32_t page) {
  if (--refs_[size_t(page)] == 0) free_.push_back(page);
}

void KVCache::seq_truncate(int seq, int64_t n) {
  check_seq(seq, "seq_truncate");
  int64_t& len = seq_len_[size_t(seq)];
  PE_CHECK(n >= 0 && n <= len, Error, "cannot truncate sequence ", seq, " to ", n, " tokens: it holds ", len);
  auto& pages = seq_pages_[size_t(seq)];
  const size_t keep = size_t((n + kPageSize - 1) / kPageSize);
  while (pages.size() > keep) {
    if (pages.back() != kReleased) release_page(pages.back());
    pages.pop_back();
  }
  len = n;
}

void KVCache::seq_copy(int src, int dst) {
  check_seq(src, "seq_copy");
  check_seq(dst, "seq_copy");
  if (src == dst) return;
  seq_truncate(dst, 0);
  seq_pages_[size_t(dst)] = seq_pages_[size_t(src)];
  for (int32_t p : seq_pages_[size_t(dst)])
    if (p != kReleased) refs_[size_t(p)]++;
  seq_len_[size_t(dst)] = seq_len_[size_t(src)];
}

void KVCache::seq_extend(int seq, int64_t n) {
  check_seq(seq, "seq_extend");
  int64_t& len = seq_len_[size_t(seq)];
  PE_CHECK(n >= 0 && len + n <= n_ctx_, ContextLengthError, "context overflow: ", len, " tokens in the context + ", n,
           " new > n_ctx ", n_ctx_);
  auto& pages = seq_pages_[size_t(seq)];
  const size_t need = size_t((len + n + kPageSize - 1) / kPageSize);
  const int64_t free_needed = int64_t(need - pages.size()) +
                              (len % kPageSize && n > 0 && refs_[size_t(pages.back())] > 1 ? 1 : 0);
  PE_CHECK(free_needed <= int64_t(free_.size()), ContextLengthError, "KV cache full: sequence ", seq, " needs ",
           free_needed, " more pages of ", kPageSize, " positions, ", free_.size(), " are free");
  if (len % kPageSize && n > 0 && refs_[size_t(pages.back())] > 1) {
    // Copy on write: the partly filled last page is shared with another sequence.
    const int32_t shared = pages.back(), own = alloc_page();
    for (int l = 0; l < n_layer_; l++) device_copy(device(), page_data(l, own), page_data(l, shared), page_bytes_);
    release_page(shared);
    pages.back() = own;
  }
  while (pages.size() < need) pages.push_back(alloc_page());
  len += n;
}

int32_t KVCache::slot(int seq, int64_t pos) const {
  check_seq(seq, "slot");
  PE_CHECK(pos >= 0 && pos < seq_len_[size_t(seq)], Error, "position ", pos, " of sequence ", seq,
           " is not in the cache");
  const int32_t page = seq_pages_[size_t(seq)][size_t(pos / kPageSize)];
  PE_CHECK(page != kReleased, Error, "position ", pos, " of sequence ", seq, " is behind its sliding window");
  return page * int32_t(kPageSize) + int32_t(pos % kPageSize);
}

void KVCache::store(Executor& ex, int layer, const Tensor& k, const Tensor& v, const Tensor& slots) {
  check_store(ex, layer, k, v, slots);
  PE_DISPATCH(ex, kv_store, ex, *this, layer, k, v, slots);
}

void KVCache::check_store(Executor& ex, int layer, const Tensor& k, const Tensor& v, const Tensor& slots) const {
  const int64_t kv_dim = int64_t(n_kv_head_) * head_dim_;
  PE_CHECK(layer >= 0 && layer < n_layer_, Error, "kv store: layer ", layer, " out of range");
  PE_CHECK(ex.device() == device(), Error, "kv store: cache on ", device_name(device()), ", executor on ",
           device_name(ex.device()));
  check_f32(ex, k, k.rows, kv_dim, "kv store: k");
  check_f32(ex, v, k.rows, kv_dim, "kv store: v");
  check_i32(ex, slots, k.rows, "kv store: slots");
}

}  // namespace pe
