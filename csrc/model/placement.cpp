#include "model/placement.h"

#include <algorithm>
#include <cstdio>
#include <string>

#include "cuda/gemm_tile.cuh"
#include "kv_cache.h"

namespace pe {

namespace {

std::string gib(size_t bytes) {
  char buf[32];
  std::snprintf(buf, sizeof buf, "%.2f GiB", double(bytes) / double(size_t(1) << 30));
  return buf;
}

}  // namespace

OffloadPlan offload_cost(const Model& model, const OffloadRequest& req, int n) {
  const ModelConfig& c = model.config();
  OffloadPlan p;
  p.n_gpu_layers = std::clamp(n, 0, int(c.n_layer));
  p.head = p.n_gpu_layers == int(c.n_layer);
  if (p.n_gpu_layers == 0) return p;
  for (int64_t l = c.n_layer - p.n_gpu_layers; l < c.n_layer; l++) p.weights += model.layer_bytes(l);
  if (p.head) p.weights += model.head_bytes();
  const int64_t positions = req.n_ctx + c.prefix_length;  // each sequence's P-Tuning v2 prefix too
  const int64_t pages = kv_pages_per_seq(positions, c.kv_window(), std::max<int64_t>(req.n_batch, 1)) * req.n_seq_max;
  p.kv_cache = size_t(p.n_gpu_layers) * size_t(pages) * 2 * size_t(c.n_head_kv) *
               KVCache::head_page_bytes(req.kv_type, c.head_dim);
  // Activations (model/forward.cpp: x, xn, qkv, att, ff_a, ff_b), the logits or hidden states of a
  // pass, the attention's split-K partials (up to 64 splits of head_dim + 2 floats per row and head)
  // and the row metadata.
  const int64_t rows = std::min<int64_t>(req.n_batch, req.n_ctx * req.n_seq_max);
  int64_t act = 2 * c.n_embd + (c.n_head + 2 * c.n_head_kv) * c.head_dim + c.n_head * c.head_dim + 3 * c.n_ff;
  // the mixture-of-experts op (ops/moe.h): logits, gathered inputs, gate, up, the experts' outputs, the
  // FFN's output, row metadata
  if (c.n_expert > 0) act += c.n_expert + 2 * c.n_embd + 2 * c.n_ff_exp + c.n_expert_used * (c.n_embd + 3);
  const int64_t out = p.head ? std::max(c.n_vocab, c.n_embd) : 0;
  const int64_t partials = std::min<int64_t>(rows, 64) * c.n_head * 64 * (c.head_dim + 2);
  // The tensor-core GEMM's half copy of x (cuda/matmul.cu), as wide as the widest matmul input, and its
  // split-K partial sums (at most kGemmMaxSplitTiles tiles of floats).
  const int64_t widest = std::max({c.n_embd, c.n_head * c.head_dim, c.n_ff, c.n_ff_exp});
  const bool gemm = rows > cuda::kGemvMaxRows;
  const size_t gemm_bytes = gemm ? size_t(cuda::gemm_x_rows(rows) * cuda::gemm_x_cols(widest)) * 2 +
                                       size_t(cuda::kGemmMaxSplitTiles) * cuda::kGemmM * cuda::kGemmN * sizeof(float)
                                 : 0;
  p.scratch = size_t(rows * (act + out) + partials) * sizeof(float) + size_t(rows) * 8 * sizeof(int32_t) +
              gemm_bytes + (size_t(16) << 20);
  return p;
}

OffloadPlan plan_offload(const Model& model, const OffloadRequest& req, size_t free_bytes) {
  const int n_layer = int(model.config().n_layer);
  PE_CHECK(req.kv_type != GGMLType::Q8_0 || req.n_gpu_layers == 0, Error, "n_gpu_layers=",
           req.n_gpu_layers < 0 ? std::string("'auto'") : std::to_string(req.n_gpu_layers),
           ": a q8_0 KV cache runs on the CPU only; use kv_type 'f16' (--kv-type f16) with the GPU, or n_gpu_layers=0");
  const size_t usable = free_bytes > kOffloadMargin ? free_bytes - kOffloadMargin : 0;
  int fits = 0;  // the largest n whose plan fits (cost grows with n)
  for (int n = 1; n <= n_layer && offload_cost(model, req, n).total() <= usable; n++) fits = n;
  if (req.n_gpu_layers < 0) return offload_cost(model, req, fits);
  const OffloadPlan want = offload_cost(model, req, req.n_gpu_layers);
  PE_CHECK(want.total() <= usable, DeviceMemoryError, "n_gpu_layers=", req.n_gpu_layers, " needs ",
           gib(want.total()), " of GPU memory (weights ", gib(want.weights), ", KV cache ", gib(want.kv_cache),
           " for n_ctx=", req.n_ctx, " x ", req.n_seq_max, " sequences, scratch ", gib(want.scratch), ") plus ",
           gib(kOffloadMargin), " headroom, but ", gib(free_bytes), " is free: pass n_gpu_layers=", fits,
           fits ? " or fewer" : "", " (-ngl ", fits, "), n_gpu_layers='auto', or a smaller n_ctx");
  return want;
}

}  // namespace pe
