#include "model/memory.h"

#include <unistd.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>

#include "kv_cache.h"

namespace pe {

namespace {

size_t mul(std::initializer_list<uint64_t> factors) {
  uint64_t r = 1;
  for (uint64_t f : factors)
    if (__builtin_mul_overflow(r, f, &r)) return SIZE_MAX;
  return size_t(r);
}
size_t add(size_t a, size_t b) { return a > SIZE_MAX - b ? SIZE_MAX : a + b; }
uint64_t nonneg(int64_t v) { return v < 0 ? 0 : uint64_t(v); }

std::string gib(size_t bytes) {
  if (bytes == SIZE_MAX) return "more than 16 EiB";
  char buf[32];
  std::snprintf(buf, sizeof buf, "%.2f GiB", double(bytes) / double(size_t(1) << 30));
  return buf;
}

// A number from a one-line file such as /sys/fs/cgroup/memory.max; 0 if absent or "max".
size_t read_limit_file(const char* path) {
  FILE* f = std::fopen(path, "r");
  if (!f) return 0;
  char buf[64] = {0};
  const size_t n = std::fread(buf, 1, sizeof buf - 1, f);
  std::fclose(f);
  buf[n] = 0;
  char* end = nullptr;
  const unsigned long long v = std::strtoull(buf, &end, 10);
  return end == buf ? 0 : size_t(v);
}

}  // namespace

size_t HostMemoryPlan::total() const { return add(add(weights, kv_cache), add(scratch, logits)); }

HostMemoryPlan host_memory_plan(const Model& model, int64_t n_ctx, int n_seq_max, int64_t n_batch, GGMLType kv_type,
                                int n_gpu_layers) {
  const ModelConfig& c = model.config();
  HostMemoryPlan p;
  p.weights = model.file().file_size();
  const uint64_t cpu_layers = nonneg(c.n_layer - n_gpu_layers);
  const uint64_t positions = nonneg(n_ctx) + nonneg(c.prefix_length);  // each sequence's P-Tuning v2 prefix too
  const uint64_t pages = mul({uint64_t(kv_pages_per_seq(int64_t(positions), c.kv_window(), std::max<int64_t>(n_batch, 1))),
                              nonneg(n_seq_max)});
  const uint64_t head_page = KVCache::head_page_bytes(kv_type, c.head_dim);  // head_dim <= 1024 (model/config.cpp)
  p.kv_cache = mul({cpu_layers, pages, 2, nonneg(c.n_head_kv), head_page});
  // An encoder-decoder's caches of the encoder's output (cross-attention keys and values per sequence and
  // decoder block, kv_type) and of the encoder's own self-attention (one layer of one sequence, float32).
  if (c.spec.family == Family::EncoderDecoder) {
    const uint64_t enc_pages = uint64_t(kv_pages_per_seq(n_ctx, 0, std::max<int64_t>(n_batch, 1)));
    const uint64_t per_layer = mul({enc_pages, 2, nonneg(c.n_head_kv)});  // head blocks
    p.kv_cache = add(p.kv_cache, mul({nonneg(c.n_layer), nonneg(n_seq_max), per_layer, head_page}));
    p.kv_cache = add(p.kv_cache, mul({per_layer, KVCache::head_page_bytes(GGMLType::F32, c.head_dim)}));
  }
  // model/forward.cpp's Activations (x, xn, qkv, att, ff_a with room for [gate | up], ff_b) and the
  // matmul's quantized activations (one byte per element plus 16 bytes per 32, of the widest input).
  uint64_t rows = std::min(nonneg(n_batch), mul({nonneg(n_ctx), nonneg(n_seq_max)}));
  if (c.spec.family == Family::EncoderDecoder) rows = std::max(rows, nonneg(n_ctx));  // an input encodes in one pass
  const uint64_t q_dim = mul({nonneg(c.n_head), nonneg(c.head_dim)}), kv_dim = mul({nonneg(c.n_head_kv), nonneg(c.head_dim)});
  uint64_t act = add(add(mul({2, nonneg(c.n_embd)}), add(q_dim, mul({2, kv_dim}))), add(q_dim, mul({3, nonneg(c.n_ff)})));
  if (c.n_expert > 0) {
    // the mixture-of-experts op (ops/moe.h): router logits (and their host copy), gathered inputs, gate and
    // up, every chosen expert's output, the FFN's output, and per row and expert three ints on each side
    const uint64_t k = nonneg(c.n_expert_used);
    act = add(act, add(mul({2, nonneg(c.n_expert)}), add(mul({2, nonneg(c.n_embd)}), mul({2, nonneg(c.n_ff_exp)}))));
    act = add(act, add(mul({k, nonneg(c.n_embd)}), mul({6, k})));
  }
  const uint64_t widest = std::max({nonneg(c.n_embd), q_dim, nonneg(c.n_ff)});
  p.scratch = add(mul({rows, act, 4}), mul({rows, add(widest, widest / 2)}));
  p.logits = mul({rows, nonneg(c.n_vocab), 4});
  return p;
}

size_t host_memory_limit() {
  const long pages = ::sysconf(_SC_PHYS_PAGES), page = ::sysconf(_SC_PAGESIZE);
  size_t limit = pages > 0 && page > 0 ? mul({uint64_t(pages), uint64_t(page)}) : SIZE_MAX;
  for (const char* f : {"/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"}) {
    const size_t v = read_limit_file(f);
    if (v > 0 && v < limit) limit = v;
  }
  return limit;
}

void check_host_memory(const Model& model, const HostMemoryPlan& p, size_t max_memory, int64_t n_ctx, int n_seq_max) {
  const size_t limit = max_memory ? max_memory : host_memory_limit();
  if (p.total() <= limit) return;
  PE_THROW(MemoryLimitError, model.file().path(), ": this model and context need ", gib(p.total()),
           " of memory (weights ", gib(p.weights), model.file().mapped() ? " mapped" : " in private memory",
           ", KV cache ", gib(p.kv_cache), " for n_ctx=", n_ctx, " x ", n_seq_max, " sequences of ",
           model.config().n_layer, " layers, scratch ", gib(p.scratch), ", logits ", gib(p.logits), ") but ",
           max_memory ? "max_memory is " : "this machine has ", gib(limit),
           ": use a smaller n_ctx, n_seq_max or n_batch", max_memory ? ", or raise max_memory" : "");
}

}  // namespace pe
