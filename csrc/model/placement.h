// How much of a model goes on the GPU: llama.cpp's n_gpu_layers, checked against the GPU's free
// memory before anything is allocated, so asking for too much is an exception that says what fits.
#pragma once
#include <cstddef>
#include <string>

#include "model/model.h"

namespace pe {

struct OffloadPlan {
  int n_gpu_layers = 0;   // the last n blocks of the stack
  bool head = false;      // output norm + LM head on the GPU (when all blocks are)
  size_t weights = 0;     // bytes of the offloaded weights
  size_t kv_cache = 0;    // bytes of the offloaded layers' KV cache
  size_t scratch = 0;     // activations, logits and workspaces of one context
  size_t total() const { return weights + kv_cache + scratch; }
};

struct OffloadRequest {
  int n_gpu_layers = 0;  // -1: "auto", as many as fit
  int64_t n_ctx = 0;
  int n_seq_max = 1;
  int64_t n_batch = 512;
  GGMLType kv_type = GGMLType::F16;
};

// Memory kept free beyond the plan: allocator granularity, CUDA graphs, other contexts' growth.
constexpr size_t kOffloadMargin = size_t(256) << 20;

// The plan for `req` on a GPU with `free_bytes` free. Throws DeviceMemoryError when an explicit
// n_gpu_layers does not fit, naming what it needs and the largest value that fits.
OffloadPlan plan_offload(const Model& model, const OffloadRequest& req, size_t free_bytes);
// Bytes of the plan for exactly n blocks (no check against free memory).
OffloadPlan offload_cost(const Model& model, const OffloadRequest& req, int n);

}  // namespace pe
