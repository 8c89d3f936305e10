// The keys and values of every layer for many sequences, in pages of kPageSize positions.
//
// A sequence is a list of pages. Copying a sequence shares its pages (a page is copied only when a
// sequence appends to a page another sequence also holds), so forking a long shared prompt costs a
// list copy; truncating returns whole pages. Where every layer attends within a sliding window, a
// sequence releases the pages wholly behind its window as it grows (seq_release_before), so the cache
// holds a window's worth of pages per sequence whatever n_ctx is (kv_pages_per_seq); a released
// page's entry in the sequence's list is kReleased. The bookkeeping here is device-neutral; how a page lays
// out its keys and values is the business of the backend that owns the storage (cpu/kv_layout.h: per KV
// head K transposed, [head_dim][position], then per KV head V as it is, [position][head_dim], so that
// attention is two matrix products per page), and only that backend's store and attention read it.
//
// Element types: F32, F16, and on the CPU Q8_0 (llama.cpp's `-ctk q8_0 -ctv q8_0`): int8 values with an
// fp16 scale per 32 consecutive dimensions of one position and head, 1.0625 bytes an element.
#pragma once
#include <cstdint>
#include <vector>

#include "executor.h"
#include "tensor.h"

namespace pe {

class KVCache {
 public:
  static constexpr int64_t kPageSize = 64;
  static constexpr int32_t kReleased = -1;
  static constexpr int kQ8Block = 32;  // dimensions per scale in a Q8_0 cache

  // Room for n_seq_max sequences of up to n_ctx positions each, in pages_per_seq pages per sequence
  // (0: all n_ctx positions; fewer with a sliding window, see kv_pages_per_seq). type: F16, F32, or
  // Q8_0 (CPU only; head_dim a multiple of 32).
  KVCache(Executor& ex, GGMLType type, int n_layer, int n_kv_head, int head_dim, int n_seq_max, int64_t n_ctx,
          int64_t pages_per_seq = 0);

  GGMLType type() const { return type_; }
  Device device() const { return storage_.device(); }
  int n_layer() const { return n_layer_; }
  int n_kv_head() const { return n_kv_head_; }
  int head_dim() const { return head_dim_; }
  int n_seq_max() const { return int(seq_pages_.size()); }
  int64_t n_ctx() const { return n_ctx_; }
  int64_t n_pages() const { return n_pages_; }
  int64_t seq_len(int seq) const;
  // Pages of sequence `seq`, in position order (kReleased for pages behind a sliding window).
  const std::vector<int32_t>& pages(int seq) const;
  // The first position whose page the sequence still holds (0 unless pages were released).
  int64_t seq_first(int seq) const;
  // Releases the pages of `seq` that lie wholly before position `pos` (keys no later row will see).
  void seq_release_before(int seq, int64_t pos);

  void clear();
  void seq_truncate(int seq, int64_t n);
  // dst becomes a copy of src (sharing its pages); dst's old contents are dropped.
  void seq_copy(int src, int dst);
  // Extends `seq` by n positions: allocates pages, and copies the last page first if it is shared.
  // Throws ContextLengthError when the sequence would pass n_ctx or the cache has no free page.
  void seq_extend(int seq, int64_t n);
  // Cache slot (page * kPageSize + offset in the page) of position `pos` of `seq`.
  int32_t slot(int seq, int64_t pos) const;

  // Writes rows of K and V (F32 [n x n_kv_head * head_dim]) of `layer` at `slots` (I32 [1 x n]).
  void store(Executor& ex, int layer, const Tensor& k, const Tensor& v, const Tensor& slots);
  // store()'s argument checks (also store_and_attend's, ops/attention.h).
  void check_store(Executor& ex, int layer, const Tensor& k, const Tensor& v, const Tensor& slots) const;

  // One layer's part of a page (its K block, then its V block), in the backend's layout.
  uint8_t* page_data(int layer, int32_t page) const {
    return static_cast<uint8_t*>(storage_.data()) + (size_t(layer) * n_pages_ + size_t(page)) * page_bytes_;
  }
  // Bytes per element of an F16 or F32 cache (the CUDA backend's types).
  size_t element_size() const { return type_ == GGMLType::F16 ? 2 : 4; }
  // Bytes of one KV head's keys (or values) in one page, scales included.
  static size_t head_page_bytes(GGMLType type, int64_t head_dim);

 private:
  int32_t alloc_page();
  void release_page(int32_t page);
  void check_seq(int seq, const char* what) const;

  GGMLType type_;
  int n_layer_, n_kv_head_, head_dim_;
  int64_t n_ctx_;
  int64_t n_pages_;
  size_t page_bytes_;  // per layer and page: K and V
  Buffer storage_;     // [layer][page][K, V]
  std::vector<std::vector<int32_t>> seq_pages_;
  std::vector<int64_t> seq_len_;
  std::vector<int32_t> refs_;  // sequences holding each page
  std::vector<int32_t> free_;  // free page ids (a stack)
};

// Pages one sequence needs at most: those of `positions`; with a sliding window over every layer
// (window > 0), only those a pass of n_batch rows can see, from the first row's window to the last row.
int64_t kv_pages_per_seq(int64_t positions, int64_t window, int64_t n_batch);

}  // namespace pe
