// How much host memory a model and a context on it take, computed before anything is allocated, so
// a context larger than the machine (or than a caller's max_memory) is an exception with the figures,
// not an allocation that takes the machine down. The GPU side has its own plan (model/placement.h).
#pragma once
#include <cstddef>
#include <cstdint>

#include "ggml_types.h"
#include "model/model.h"

namespace pe {

struct HostMemoryPlan {
  size_t weights = 0;   // the model file: mapped pages the forward pass reads, or its private copy
  size_t kv_cache = 0;  // the CPU blocks' KV cache
  size_t scratch = 0;   // activations of one pass of min(n_batch, n_ctx * n_seq_max) rows, matmul buffers
  size_t logits = 0;    // the logits of one full pass (every row's, as logits(prompt) returns them)
  // Saturates at SIZE_MAX instead of wrapping: every factor comes from the file or the caller.
  size_t total() const;
};

// The plan for a context of n_ctx positions x n_seq_max sequences, n_batch rows per pass, with the
// model's last n_gpu_layers blocks (their KV cache) on a GPU.
HostMemoryPlan host_memory_plan(const Model& model, int64_t n_ctx, int n_seq_max, int64_t n_batch, GGMLType kv_type,
                                int n_gpu_layers);

// What this process may use: physical memory, or the cgroup's limit (a container) when lower.
size_t host_memory_limit();

// Throws MemoryLimitError naming the model, the figures and what to change when the plan exceeds
// max_memory (0: host_memory_limit()).
void check_host_memory(const Model& model, const HostMemoryPlan& plan, size_t max_memory, int64_t n_ctx,
                       int n_seq_max);

}  // namespace pe
