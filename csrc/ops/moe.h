// A mixture-of-experts feed-forward layer (Qwen3-MoE; llama.cpp's build_moe_ffn with softmax gating):
// a router scores every expert for each row, the row goes through its n_used best experts (each a
// SwiGLU FFN of its own) and gets the sum of their outputs weighted by the router's probabilities.
//
// How it runs: the router is one matmul; the choice of experts is made on the host (softmax, top-k,
// renormalisation: a few floats per row); then the rows are grouped by expert, so that each chosen
// expert's weights are read once for all the rows of the batch that chose it, and each expert is three
// ordinary matmuls on its 2-D slice of the stacked weights (every type and ISA the matmul op has, on
// either device); `moe_combine` (the one kernel of its own, per backend) adds up each row's experts.
#pragma once
#include <string>
#include <vector>

#include "executor.h"
#include "ops/activation.h"
#include "tensor.h"

namespace pe {

struct InputStats;

// One layer's experts: ggml's 3-D [n_expert, rows, cols] tensors viewed as 2-D [n_expert * rows x cols]
// (expert e's matrix is rows [e * rows, (e + 1) * rows)), and the router.
struct Experts {
  Tensor router;  // ffn_gate_inp: [n_expert x n_embd]
  Tensor gate;    // ffn_gate_exps: [n_expert * n_ff x n_embd]
  Tensor up;      // ffn_up_exps: [n_expert * n_ff x n_embd]
  Tensor down;    // ffn_down_exps: [n_expert * n_embd x n_ff]
};

struct MoEParams {
  int64_t n_expert = 0;
  int64_t n_used = 0;         // experts per row (top-k)
  int64_t n_ff = 0;           // an expert's hidden size
  bool norm_weights = true;   // the chosen experts' probabilities rescaled to sum to 1 (norm_topk_prob)
  Activation act = Activation::SiLU;
};

// Scratch of the op on one device, grown to the largest batch seen (Activations holds one per device).
struct MoEScratch {
  Buffer logits, x, gate, up, y, rows;
  std::vector<float> host_logits;
  std::vector<int32_t> host_rows;
  // Room for n rows of an n_embd-wide input.
  void reserve(const MoEParams& p, int64_t n_embd, int64_t n, Device device);
};

// out = sum over the row's chosen experts e of w_e * down_e(act(gate_e x) * up_e x); x, out: F32
// [n x n_embd], distinct. `name` (e.g. "blk.3") names the layer in errors. `stats` (an imatrix being
// collected, CPU only): the router's input, and each expert's gate/up and down inputs for that expert.
void moe_ffn(Executor& ex, const Experts& w, const MoEParams& p, const Tensor& x, const Tensor& out,
             MoEScratch& s, const std::string& name, InputStats* stats = nullptr);

// The backends' part: out[r] = sum_j weight[r * k + j] * y[slot[r * k + j]] for j < k (in that order),
// overwriting out. y: F32 [m x d]; slot: I32 [1 x n * k], each in [0, m); weight: F32 [1 x n * k]; out:
// F32 [n x d].
void moe_combine(Executor& ex, const Tensor& y, const Tensor& slot, const Tensor& weight, int64_t k,
                 const Tensor& out);

}  // namespace pe
