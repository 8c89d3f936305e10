// An inference context: a KV cache holding many sequences on one model's weights, and the forward
// pass over batches of rows from any of them.
#pragma once
#include <memory>
#include <mutex>
#include <utility>
#include <vector>

#include "executor.h"
#include "kv_cache.h"
#include "model/forward.h"
#include "model/model.h"
#include "model/sequence.h"

namespace pe {

// One step's input (llama.cpp's llama_batch): rows of tokens, each appended at the next position of
// its sequence, and whether the row's logits are wanted. Rows of one sequence are evaluated in order.
struct Batch {
  std::vector<int32_t> tokens, seqs;
  std::vector<uint8_t> logits;

  void add(int32_t token, int32_t seq, bool want_logits) {
    tokens.push_back(token);
    seqs.push_back(seq);
    logits.push_back(want_logits);
  }
  int64_t size() const { return int64_t(tokens.size()); }
  int64_t n_logits() const;
};

class Context {
 public:
  // n_ctx: positions per sequence; n_seq_max: sequences; n_batch: rows per forward pass (a longer
  // batch is evaluated in passes of n_batch rows); kv_type: F16 (default) or F32. Before allocating,
  // the host memory it needs with the model (model/memory.h) is checked against max_memory bytes
  // (0: the machine's memory); too much throws MemoryLimitError with the figures.
  Context(std::shared_ptr<const Model> model, std::shared_ptr<Executor> executor, int64_t n_ctx, int n_seq_max = 1,
          int64_t n_batch = 512, GGMLType kv_type = GGMLType::F16, size_t max_memory = 0);

  // Evaluates every row of the batch: all rows go through each matmul together, so the weights are
  // read once per pass for all the sequences in it. logits: null, or room for batch.n_logits() rows of
  // n_vocab floats, filled in row order. On an error, the sequences are left as before the call
  // (except a sequence whose bidirectional prefix was being re-evaluated, or whose sliding window moved
  // past keys the restored sequence needs: those are emptied).
  // hidden: instead of logits, the wanted rows' final hidden states after the output norm
  // (batch.n_logits() rows of n_embd floats), from which embeddings are pooled.
  void decode(const Batch& batch, float* logits, bool hidden = false);
  // decode() for sampling: each wanted row's top_logits (ops/top_logits.h) come back instead of its
  // logits: k[i] and inv_t[i] for the i-th wanted row (k in [1, min(n_vocab, k_max)], k_max at most
  // kTopLogitsMax, inv_t >= 0); ids and values [n_logits x k_max], stats [n_logits x 2]. The logits
  // stay where the output layer computed them (on the GPU when it is offloaded: a decode step then
  // copies kilobytes to the host, not n_vocab floats a row); row_logits(serial, i, out) copies wanted
  // row i's (n_vocab floats) until the next call that evaluates anything. Returns the call's serial
  // number, which row_logits checks: a row of a later call is never taken for one of this call.
  // u (nullptr: none) asks for draws: where u[i] is in [0, 1), drawn[i] is the token that
  // cpu::softmax_draw picks from the whole row at inv_t[i] and u[i] (plain sampling at a temperature,
  // done on the host over the pool, every row at once, instead of by the caller on a copied row), and
  // that row's weight sum is not computed (stats 0); elsewhere u[i] < 0 and drawn[i] is -1.
  int64_t decode_top(const Batch& batch, const int32_t* k, const float* inv_t, int k_max, int32_t* ids,
                     float* values, float* stats, const double* u = nullptr, int32_t* drawn = nullptr);
  void row_logits(int64_t serial, int64_t i, float* out);
  // Family::EncoderDecoder: runs the encoder over `tokens` (one pass, every token sees all of them) and
  // keeps the keys and values of its output for every decoder block's cross-attention in sequence `seq`,
  // which starts over empty: decode() then appends decoder tokens to it (the first: the model's
  // decoder_start_token). seq_copy shares the encoder's keys and values with the copy.
  void encode(const int32_t* tokens, int64_t n, int seq = 0);
  // Encoder positions sequence `seq` holds (0: encode() not called since it was last emptied).
  int64_t seq_encoded_len(int seq) const { return cross_kv_ ? cross_kv_->seq_len(seq) : 0; }

  // The batch-of-one case: n tokens appended to `seq`; logits of the last token, of all, or none.
  void eval(const int32_t* tokens, int64_t n, float* logits, bool all_logits, int seq = 0);

  // Tokens in sequence `seq` (a P-Tuning v2 prefix before them is not counted).
  int64_t seq_len(int seq) const;
  // Keeps the first n tokens of `seq`; where a sliding window has released keys the token after them
  // would need, the sequence is emptied instead (callers read seq_len back).
  void seq_truncate(int seq, int64_t n);
  // dst becomes a copy of src, sharing its cache pages until either appends.
  void seq_copy(int src, int dst);
  void clear();

  // Importance-matrix collection: while on, every pass adds each linear layer's input to stats()
  // (CPU layers only: a model with GPU layers refuses). Turning it on starts from zero.
  // covariance_tensors: the weights (by tensor name) that get an x^T x; empty: all of them.
  void collect_input_stats(bool on, bool covariance = false, const std::vector<std::string>& covariance_tensors = {});
  const InputStats& input_stats() const { return input_stats_; }

  int64_t n_ctx() const { return kv().n_ctx() - prefix_; }
  int n_seq_max() const { return kv().n_seq_max(); }
  // Blocks on the GPU (the model's offload), and the bytes of this context's GPU KV cache.
  int n_gpu_layers() const { return model_->gpu().n_layers; }
  size_t gpu_kv_bytes() const;
  int n_threads() const { return ex_->n_threads(); }
  const Model& model() const { return *model_; }
  const std::shared_ptr<Executor>& executor() const { return ex_; }

 private:
  struct Row {
    int32_t token, seq;
    bool logits;
  };
  void check_rows(const Batch& batch) const;
  // Truncates every part's cache of `seq` to `keep` positions, or empties it when a sliding window has
  // released keys its next row would need.
  void truncate_kv(int seq, int64_t keep);
  std::vector<Row> expand_replays(const Batch& batch);
  void decode_rows(const Batch& batch, float* logits, bool hidden, const LogitsSummary* top);
  // decode_top's draws over the rows it left (see decode_top).
  void draw_rows(const double* u, const float* inv_t, int32_t* drawn);
  void run_pass(const Row* rows, int64_t n, float* out, bool hidden, const LogitsSummary* summary = nullptr);
  bool head_on_gpu() const { return gpu_ex_ && model_->gpu().head; }
  // Both executors' locks (CPU, then GPU): contexts sharing either take turns.
  std::pair<std::unique_lock<std::mutex>, std::unique_lock<std::mutex>> lock();
  // The cache of the first part: every part's cache holds the same sequences in the same pages,
  // so its bookkeeping answers for all. Changes go to every part (for_each_kv).
  const KVCache& kv() const { return kv_.front(); }
  template <typename F>
  void for_each_kv(F f) {
    for (KVCache& kv : kv_) f(kv);
  }

  std::shared_ptr<const Model> model_;
  std::shared_ptr<Executor> ex_;      // the CPU's
  std::shared_ptr<Executor> gpu_ex_;  // the model's GPU stream, when blocks are offloaded
  int64_t n_batch_;
  std::vector<KVCache> kv_;  // the CPU blocks' cache, then the GPU blocks' (when offloaded)
  // Family::EncoderDecoder: each sequence's cross-attention keys and values (a layer per decoder block,
  // a position per input token), and the encoder's own self-attention cache (one sequence, reused).
  std::unique_ptr<KVCache> cross_kv_, enc_kv_;
  // Cache positions [0, prefix_) of every sequence that holds anything are the model's P-Tuning v2
  // prefix (ModelConfig::prefix_length); its tokens follow, so a token's cache position is its
  // index + prefix_. The prefix is written when a sequence gets its first token and never truncated.
  int64_t prefix_ = 0;
  SequencePolicy policy_;
  std::vector<SequenceState> seqs_;
  RowPlan plan_;
  ContextRope rope_;
  Activations act_, gpu_act_;
  // decode_top's logits, wanted rows [0, top_rows_) of the last call: on the host, except for a GPU
  // head's last pass, whose rows [top_gpu_first_, top_rows_) stay in gpu_act_.out.
  std::vector<float> top_logits_;
  int64_t top_rows_ = 0, top_gpu_first_ = 0, top_serial_ = 0;
  InputStats input_stats_;
};

}  // namespace pe
