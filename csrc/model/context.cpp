#include "model/context.h"

#include <algorithm>
#include <cmath>
#include <cstring>

#include "cpu/sampling.h"
#include "model/memory.h"
#include "ops/elementwise.h"
#include "ops/matmul.h"
#include "ops/top_logits.h"

namespace pe {

int64_t Batch::n_logits() const { return int64_t(std::count(logits.begin(), logits.end(), uint8_t(1))); }

Context::Context(std::shared_ptr<const Model> model, std::shared_ptr<Executor> executor, int64_t n_ctx, int n_seq_max,
                 int64_t n_batch, GGMLType kv_type, size_t max_memory)
    : model_(std::move(model)),
      ex_(std::move(executor)),
      gpu_ex_(model_->gpu().executor),
      n_batch_(n_batch),
      prefix_(model_->config().prefix_length),
      policy_(model_->config()),
      rope_{model_->rope(n_ctx, false), model_->rope(n_ctx, true)} {
  const ModelConfig& c = model_->config();
  PE_CHECK(ex_->device() == Device::CPU, Error, "a context takes the CPU executor (the GPU's is the model's)");
  PE_CHECK(n_batch > 0, Error, "n_batch must be positive");
  PE_CHECK(n_ctx > 0 && n_ctx <= (int64_t(1) << 24), Error, "n_ctx must be in [1, 16M], not ", n_ctx);
  PE_CHECK(n_seq_max >= 1 && n_seq_max <= 4096, Error, "n_seq_max must be in [1, 4096], not ", n_seq_max);
  seqs_.resize(size_t(n_seq_max));
  PE_CHECK(c.spec.positions != Positions::Learned || n_ctx <= c.n_ctx_train, ContextLengthError, "n_ctx ", n_ctx,
           " is more than the ", c.n_ctx_train, " positions this ", c.arch, " model has learned");
  const int n_gpu = model_->gpu().n_layers;
  check_host_memory(*model_, host_memory_plan(*model_, n_ctx, n_seq_max, n_batch, kv_type, n_gpu), max_memory, n_ctx,
                    n_seq_max);
  model_->pack_cpu_weights(*ex_);
  kv_.reserve(2);
  const int64_t positions = n_ctx + prefix_;
  const int64_t pages = kv_pages_per_seq(positions, c.kv_window(), n_batch);
  kv_.emplace_back(*ex_, kv_type, int(c.n_layer) - n_gpu, int(c.n_head_kv), int(c.head_dim), n_seq_max, positions,
                   pages);
  if (n_gpu)
    kv_.emplace_back(*gpu_ex_, kv_type, n_gpu, int(c.n_head_kv), int(c.head_dim), n_seq_max, positions, pages);
  if (c.spec.family == Family::EncoderDecoder) {
    cross_kv_ = std::make_unique<KVCache>(*ex_, kv_type, int(c.n_layer), int(c.n_head_kv), int(c.head_dim), n_seq_max,
                                          n_ctx);
    // The encoder's own keys and values live for one block each (StackPart::one_kv_layer): one layer, in
    // float32, which the attention reads without conversions.
    enc_kv_ = std::make_unique<KVCache>(*ex_, GGMLType::F32, 1, int(c.n_head_kv), int(c.head_dim), 1, n_ctx);
  }
  const int64_t rows = std::min<int64_t>(n_batch, n_ctx * n_seq_max);
  act_.reserve(c, rows, Device::CPU);
  if (n_gpu) gpu_act_.reserve(c, rows, Device::CUDA);
}

size_t Context::gpu_kv_bytes() const {
  if (kv_.size() < 2) return 0;
  const KVCache& g = kv_.back();
  return size_t(g.n_layer()) * size_t(g.n_pages()) * 2 * size_t(g.n_kv_head()) *
         KVCache::head_page_bytes(g.type(), g.head_dim());
}

std::pair<std::unique_lock<std::mutex>, std::unique_lock<std::mutex>> Context::lock() {
  auto cpu = ex_->lock();
  return {std::move(cpu), gpu_ex_ ? gpu_ex_->lock() : std::unique_lock<std::mutex>()};
}

int64_t Context::seq_len(int seq) const {
  const int64_t n = kv().seq_len(seq);
  return n > prefix_ ? n - prefix_ : 0;
}

void Context::seq_truncate(int seq, int64_t n) {
  auto lock = this->lock();
  const int64_t len = seq_len(seq);
  PE_CHECK(n >= 0 && n <= len, Error, "cannot truncate sequence ", seq, " to ", n, " tokens: it holds ", len);
  const int64_t keep = kv().seq_len(seq) > 0 ? prefix_ + n : 0;  // the prefix stays
  truncate_kv(seq, keep);
  policy_.truncate(seqs_[size_t(seq)], std::min(n, seq_len(seq)));
}

void Context::truncate_kv(int seq, int64_t keep) {
  // Behind a sliding window the cache holds only the last positions: a shorter sequence whose next row
  // would see released keys cannot continue, so it starts over.
  const int64_t window = model_->config().kv_window();
  if (window > 0 && keep > 0 && keep + 1 - window < kv().seq_first(seq)) keep = 0;
  for_each_kv([&](KVCache& kv) { kv.seq_truncate(seq, keep); });
}

void Context::seq_copy(int src, int dst) {
  auto lock = this->lock();
  for_each_kv([&](KVCache& kv) { kv.seq_copy(src, dst); });
  if (cross_kv_) cross_kv_->seq_copy(src, dst);
  seqs_[size_t(dst)] = seqs_[size_t(src)];
}

void Context::clear() {
  auto lock = this->lock();
  for_each_kv([](KVCache& kv) { kv.clear(); });
  if (cross_kv_) cross_kv_->clear();
  for (auto& s : seqs_) s = SequenceState{};
}

void Context::encode(const int32_t* tokens, int64_t n, int seq) {
  auto lock = this->lock();
  top_rows_ = 0;
  top_serial_++;
  model_->file().check_unchanged();
  const ModelConfig& c = model_->config();
  PE_CHECK(cross_kv_, UnsupportedModelError, "a ", c.arch, " model has no encoder (encode() is for encoder-decoder "
           "models such as t5)");
  PE_CHECK(n > 0, Error, "encode needs at least one token");
  PE_CHECK(seq >= 0 && seq < n_seq_max(), Error, "sequence id ", seq, " is out of range [0, ", n_seq_max(), ")");
  PE_CHECK(n <= enc_kv_->n_ctx(), ContextLengthError, "an encoder input of ", n, " tokens is longer than n_ctx ",
           enc_kv_->n_ctx());
  for (int64_t i = 0; i < n; i++)
    PE_CHECK(tokens[i] >= 0 && tokens[i] < c.n_vocab, Error, "token id ", tokens[i], " at index ", i,
             " is out of range [0, ", c.n_vocab, ")");
  // A new input: the sequence's decoded tokens and its old encoder output go.
  for_each_kv([&](KVCache& kv) { kv.seq_truncate(seq, 0); });
  policy_.truncate(seqs_[size_t(seq)], 0);
  cross_kv_->seq_truncate(seq, 0);

  KVCache& ekv = *enc_kv_;
  ekv.clear();
  ekv.seq_extend(0, n);
  RowPlan p;
  for (int64_t i = 0; i < n; i++) {
    p.token.push_back(tokens[i]);
    p.seq.push_back(0);
    p.rope_pos.push_back(int32_t(i));
    p.rope_pos2.push_back(0);
    p.key_begin.push_back(0);
    p.key_end.push_back(int32_t(n));
    p.key_begin_window.push_back(0);
    p.slot.push_back(ekv.slot(0, i));
    p.logit_rows.push_back(int32_t(i));
  }
  act_.reserve(c, n, Device::CPU);
  StackPart enc;
  enc.ex = ex_.get();
  enc.kv = &ekv;
  enc.one_kv_layer = true;
  enc.act = &act_;
  enc.bias = position_bias(c, model_->encoder, true);
  enc.tensor_prefix = c.spec.encoder_prefix;
  enc.rounding = MatmulRounding::Bf16;
  for (const Layer& L : model_->encoder.layers) enc.layers.push_back(&L);
  const int64_t d = c.n_embd, kv_dim = c.n_head_kv * c.head_dim;
  std::vector<float> h(size_t(n * d)), k(size_t(n * kv_dim)), v(size_t(n * kv_dim));
  const Tensor H = f32_tensor(h.data(), n, d, d), K = f32_tensor(k.data(), n, kv_dim, kv_dim),
               V = f32_tensor(v.data(), n, kv_dim, kv_dim);
  forward_decoder(*model_, enc, {enc}, enc, model_->encoder.input, model_->encoder.head, p, rope_, H, true);

  // Every decoder block's cross-attention keys and values of the encoder's output, once per input.
  try {
    cross_kv_->seq_extend(seq, n);
    std::vector<int32_t> slots(static_cast<size_t>(n));
    for (int64_t i = 0; i < n; i++) slots[size_t(i)] = cross_kv_->slot(seq, i);
    const Tensor S{GGMLType::I32, slots.data(), 1, n, size_t(n) * sizeof(int32_t), Device::CPU};
    for (int64_t l = 0; l < c.n_layer; l++) {
      const Layer& L = model_->decoder.layers[size_t(l)];
      matmul(*ex_, L.cross_k.w, H, K, MatmulRounding::Bf16);
      if (!L.cross_k.b.empty()) add_bias(*ex_, K, L.cross_k.b);
      matmul(*ex_, L.cross_v.w, H, V, MatmulRounding::Bf16);
      if (!L.cross_v.b.empty()) add_bias(*ex_, V, L.cross_v.b);
      cross_kv_->store(*ex_, int(l), K, V, S);
    }
    model_->file().check_unchanged();
  } catch (...) {
    cross_kv_->seq_truncate(seq, 0);
    throw;
  }
}

void Context::eval(const int32_t* tokens, int64_t n, float* logits, bool all_logits, int seq) {
  PE_CHECK(n > 0, Error, "eval needs at least one token");
  Batch b;
  for (int64_t i = 0; i < n; i++) b.add(tokens[i], seq, logits && (all_logits || i == n - 1));
  decode(b, logits);
}

void Context::check_rows(const Batch& batch) const {
  const int64_t n = batch.size(), n_vocab = model_->config().n_vocab;
  PE_CHECK(n > 0, Error, "decode needs at least one row");
  PE_CHECK(int64_t(batch.seqs.size()) == n && int64_t(batch.logits.size()) == n, Error,
           "batch: tokens, sequence ids and logit flags differ in length");
  std::vector<int64_t> count(seqs_.size(), 0);
  for (int64_t i = 0; i < n; i++) {
    PE_CHECK(batch.tokens[size_t(i)] >= 0 && batch.tokens[size_t(i)] < n_vocab, Error, "token id ",
             batch.tokens[size_t(i)], " at index ", i, " is out of range [0, ", n_vocab, ")");
    const int32_t s = batch.seqs[size_t(i)];
    PE_CHECK(s >= 0 && s < n_seq_max(), Error, "sequence id ", s, " at index ", i, " is out of range [0, ",
             n_seq_max(), ")");
    count[size_t(s)]++;
  }
  for (int s = 0; s < n_seq_max(); s++)
    PE_CHECK(seq_len(s) + count[size_t(s)] <= n_ctx(), ContextLengthError, "context overflow: ", seq_len(s),
             " tokens in the context + ", count[size_t(s)], " new > n_ctx ", n_ctx(),
             n_seq_max() > 1 ? str_cat(" (sequence ", s, ")") : std::string());
}

// A sequence whose bidirectional prefix ends in this batch, but whose earlier tokens were evaluated
// causally, is emptied and its tokens are put back ahead of its rows (without logits); so is an
// encoder's sequence that gets more tokens (each of its tokens sees all the others).
std::vector<Context::Row> Context::expand_replays(const Batch& batch) {
  std::vector<Row> rows;
  rows.reserve(size_t(batch.size()));
  std::vector<std::vector<int32_t>> incoming;
  const Mask mask = model_->config().spec.mask;
  if (mask == Mask::PrefixLM || mask == Mask::Bidirectional) {
    incoming.resize(seqs_.size());
    for (int64_t i = 0; i < batch.size(); i++) incoming[size_t(batch.seqs[size_t(i)])].push_back(batch.tokens[size_t(i)]);
  }
  std::vector<uint8_t> seen(seqs_.size(), 0);
  for (int64_t i = 0; i < batch.size(); i++) {
    const int32_t s = batch.seqs[size_t(i)];
    if (!incoming.empty() && !seen[size_t(s)]) {
      seen[size_t(s)] = 1;
      const auto& in = incoming[size_t(s)];
      SequenceState& st = seqs_[size_t(s)];
      if (policy_.needs_replay(st, in.data(), int64_t(in.size()))) {
        const std::vector<int32_t> history = st.tokens;
        for_each_kv([&](KVCache& kv) { kv.seq_truncate(s, 0); });
        policy_.truncate(st, 0);
        for (int32_t t : history) rows.push_back(Row{t, s, false});
      }
    }
    rows.push_back(Row{batch.tokens[size_t(i)], s, batch.logits[size_t(i)] != 0});
  }
  return rows;
}

void Context::decode(const Batch& batch, float* logits, bool hidden) {
  auto lock = this->lock();
  decode_rows(batch, logits, hidden, nullptr);
}

int64_t Context::decode_top(const Batch& batch, const int32_t* k, const float* inv_t, int k_max, int32_t* ids,
                            float* values, float* stats, const double* u, int32_t* drawn) {
  auto lock = this->lock();
  const int64_t n_vocab = model_->config().n_vocab, n_want = batch.n_logits();
  PE_CHECK(k_max >= 1 && k_max <= kTopLogitsMax, Error, "decode_top: k_max ", k_max, " is not in [1, ",
           kTopLogitsMax, "]");
  PE_CHECK(!u || drawn, Error, "decode_top: draws need somewhere to go");
  std::vector<float> sum_inv_t(inv_t, inv_t + n_want);  // a drawn row's weight sum is not asked for
  for (int64_t i = 0; i < n_want; i++) {
    PE_CHECK(k[i] >= 1 && k[i] <= std::min<int64_t>(k_max, n_vocab), Error, "decode_top: k of wanted row ", i, " is ",
             k[i], ", not in [1, min(k_max ", k_max, ", n_vocab ", n_vocab, ")]");
    PE_CHECK(inv_t[i] >= 0.f && std::isfinite(inv_t[i]), Error, "decode_top: inv_t of wanted row ", i, " is ",
             inv_t[i], ", not finite and >= 0");
    if (u && u[i] >= 0) {
      PE_CHECK(u[i] < 1 && inv_t[i] > 0.f, Error, "decode_top: a draw for wanted row ", i, " needs u in [0, 1) and "
               "inv_t > 0, got u ", u[i], ", inv_t ", inv_t[i]);
      sum_inv_t[size_t(i)] = 0.f;
    }
    PE_CHECK(!u || !std::isnan(u[i]), Error, "decode_top: u of wanted row ", i, " is NaN");
  }
  LogitsSummary top{k, sum_inv_t.data(), k_max, ids, values, stats};
  decode_rows(batch, nullptr, false, &top);
  if (u) draw_rows(u, inv_t, drawn);
  return top_serial_;
}

void Context::draw_rows(const double* u, const float* inv_t, int32_t* drawn) {
  const int64_t n_vocab = model_->config().n_vocab, on_host = std::min(top_rows_, top_gpu_first_);
  // Rows the output layer left on the GPU come to the host first, in one copy.
  const float* gpu_rows = nullptr;
  std::vector<float> copied;
  bool gpu_draws = false;
  for (int64_t i = on_host; i < top_rows_; i++) gpu_draws = gpu_draws || u[i] >= 0;
  if (gpu_draws) {
    copied.resize(size_t((top_rows_ - on_host) * n_vocab));
    copy_between(*gpu_ex_, Device::CPU, copied.data(), Device::CUDA, gpu_act_.out.data(),
                 copied.size() * sizeof(float));
    gpu_rows = copied.data();
  }
  ex_->pool().for_each_dynamic(top_rows_, [&](int64_t i) {
    const float* row = i < on_host ? top_logits_.data() + i * n_vocab : gpu_rows + (i - on_host) * n_vocab;
    // -1 also for a row holding a NaN or no finite maximum (which stats[1] reports).
    drawn[i] = u[i] >= 0 ? int32_t(cpu::softmax_draw(row, n_vocab, inv_t[i], u[i])) : -1;
  });
}

void Context::row_logits(int64_t serial, int64_t i, float* out) {
  auto lock = this->lock();
  PE_CHECK(serial == top_serial_ && top_rows_ > 0, Error, "row_logits: the logits of decode_top call ", serial,
           " are gone (this context has evaluated rows since)");
  PE_CHECK(i >= 0 && i < top_rows_, Error, "row_logits: wanted row ", i, " is out of range [0, ", top_rows_, ")");
  const int64_t n_vocab = model_->config().n_vocab;
  if (head_on_gpu() && i >= top_gpu_first_) {
    copy_between(*gpu_ex_, Device::CPU, out, Device::CUDA,
                 static_cast<const float*>(gpu_act_.out.data()) + (i - top_gpu_first_) * n_vocab,
                 size_t(n_vocab) * sizeof(float));
  } else {
    std::memcpy(out, top_logits_.data() + i * n_vocab, size_t(n_vocab) * sizeof(float));
  }
}

void Context::decode_rows(const Batch& batch, float* logits, bool hidden, const LogitsSummary* top) {
  top_rows_ = 0;  // a pass replaces the logits decode_top left
  top_serial_++;
  model_->file().check_unchanged();
  check_rows(batch);
  PE_CHECK(hidden || (!logits && !top) || model_->decoder.head.output.present(), UnsupportedModelError, "a ",
           model_->config().arch, " model has no language-model head: ask for embeddings (hidden states) instead");
  // What each sequence held before (cache positions, and tokens), to undo a failed call.
  std::vector<int64_t> old_kv(seqs_.size()), old_len(seqs_.size());
  for (size_t s = 0; s < seqs_.size(); s++) old_kv[s] = kv().seq_len(int(s)), old_len[s] = seq_len(int(s));
  const std::vector<Row> rows = expand_replays(batch);
  for (size_t s = 0; s < seqs_.size(); s++) {
    old_kv[s] = std::min(old_kv[s], kv().seq_len(int(s)));
    old_len[s] = std::min(old_len[s], seq_len(int(s)));
  }
  try {
    // Positions of the rows, and the sequences' tokens (which fix a bidirectional prefix).
    std::vector<int64_t> pos(rows.size());
    for (size_t r = 0; r < rows.size(); r++) {
      SequenceState& st = seqs_[size_t(rows[r].seq)];
      pos[r] = int64_t(st.tokens.size());
      policy_.append(st, &rows[r].token, 1);
    }
    const int64_t n = int64_t(rows.size()), n_vocab = model_->config().n_vocab;
    const bool gpu_head = head_on_gpu();
    if (top && !gpu_head) top_logits_.resize(size_t(batch.n_logits() * n_vocab));
    int64_t wanted = 0;  // wanted rows in the passes before
    for (int64_t begin = 0; begin < n;) {
      int64_t end = std::min(n, begin + n_batch_);
      while (end < n && policy_.joins_next(seqs_[size_t(rows[size_t(end - 1)].seq)], pos[size_t(end - 1)])) {
        PE_CHECK(rows[size_t(end)].seq == rows[size_t(end - 1)].seq, Error, "batch: the bidirectional prefix of "
                 "sequence ", rows[size_t(end - 1)].seq, " must be consecutive rows");
        end++;
      }
      int64_t n_want = 0;
      for (int64_t r = begin; r < end; r++) n_want += rows[size_t(r)].logits;
      if (top) {
        LogitsSummary s = *top;
        s.k += wanted, s.inv_t += wanted, s.stats += 2 * wanted;
        s.ids += wanted * top->k_max, s.values += wanted * top->k_max;
        run_pass(rows.data() + begin, end - begin, gpu_head ? nullptr : top_logits_.data() + wanted * n_vocab, false,
                 &s);
        if (gpu_head && end < n && n_want > 0) {  // the next pass overwrites the GPU's copy
          top_logits_.resize(size_t((wanted + n_want) * n_vocab));
          copy_between(*gpu_ex_, Device::CPU, top_logits_.data() + wanted * n_vocab, Device::CUDA, gpu_act_.out.data(),
                       size_t(n_want * n_vocab) * sizeof(float));
        }
        top_gpu_first_ = gpu_head ? wanted : batch.n_logits();
      } else {
        run_pass(rows.data() + begin, end - begin, logits, hidden);
        const int64_t width = hidden ? model_->config().n_embd : n_vocab;
        if (logits) logits += n_want * width;
      }
      wanted += n_want;
      begin = end;
    }
    if (top) top_rows_ = wanted;
    // The weights were read from the mapping: a file that changed during the pass (mapped_file.h)
    // gave zeros or other weights, so the pass is undone.
    model_->file().check_unchanged();
  } catch (...) {
    for (size_t s = 0; s < seqs_.size(); s++) {
      if (kv().seq_len(int(s)) > old_kv[s]) truncate_kv(int(s), old_kv[s]);
      if (int64_t(seqs_[s].tokens.size()) > old_len[s]) policy_.truncate(seqs_[s], std::min(old_len[s], seq_len(int(s))));
    }
    throw;
  }
}

void Context::run_pass(const Row* rows, int64_t n, float* logits, bool hidden, const LogitsSummary* summary) {
  RowPlan& p = plan_;
  p.clear();
  // Pages wholly behind the window of each sequence's first row in this pass are never read again.
  if (const int64_t window = model_->config().kv_window(); window > 0) {
    std::vector<bool> seen(seqs_.size());
    for (int64_t r = 0; r < n; r++) {
      const int32_t s = rows[r].seq;
      if (seen[size_t(s)]) continue;
      seen[size_t(s)] = true;
      const int64_t first = kv().seq_len(s) + 1 - window;
      for_each_kv([&](KVCache& kv) { kv.seq_release_before(s, first); });
    }
  }
  for (int64_t r = 0; r < n; r++) {
    const int32_t s = rows[r].seq;
    if (prefix_ > 0 && kv().seq_len(s) == 0) {  // a new sequence: its cache starts with the prefix
      for_each_kv([&](KVCache& kv) { kv.seq_extend(s, prefix_); });
      for (int64_t i = 0; i < prefix_; i++) p.prefix_slot.push_back(kv().slot(s, i));
    }
    const int64_t at = kv().seq_len(s), pos = at - prefix_;  // cache position, token index
    for_each_kv([&](KVCache& kv) { kv.seq_extend(s, 1); });
    // Positions count tokens from 0 after the prefix (THUDM's get_position_ids); keys are cache
    // positions, the prefix's included (key_begin stays 0: a prefix comes with causal attention only).
    const RowPlace place = policy_.place(seqs_[size_t(s)], pos);
    p.token.push_back(rows[r].token);
    p.seq.push_back(s);
    p.rope_pos.push_back(place.rope_pos);
    p.rope_pos2.push_back(place.rope_pos2);
    p.key_begin.push_back(place.key_begin);
    p.key_end.push_back(int32_t(place.key_end + prefix_));
    p.key_begin_window.push_back(place.key_begin_window);
    p.slot.push_back(kv().slot(s, at));
    if (cross_kv_) {
      const int64_t n_enc = cross_kv_->seq_len(s);
      PE_CHECK(n_enc > 0, Error, "sequence ", s, " of this ", model_->config().arch,
               " (encoder-decoder) context has no encoder input: call encode() before decoding it");
      p.cross_key_begin.push_back(0);
      p.cross_key_end.push_back(int32_t(n_enc));
    }
    if (rows[r].logits) p.logit_rows.push_back(int32_t(r));
  }
  const ModelConfig& c = model_->config();
  const GpuLayers& gpu = model_->gpu();
  PE_CHECK(gpu.n_layers == (kv_.size() > 1 ? kv_.back().n_layer() : 0), Error,
           "the model was offloaded to the GPU after this context was created: create a new context");
  act_.reserve(c, n, Device::CPU);
  if (gpu_ex_) gpu_act_.reserve(c, n, Device::CUDA);
  const int64_t width = hidden ? c.n_embd : c.n_vocab;
  const Tensor out = logits && !p.logit_rows.empty()
                         ? f32_tensor(logits, int64_t(p.logit_rows.size()), width, width)
                         : Tensor{};
  // The first n_layer - n_gpu blocks on the CPU, the rest on the GPU (llama.cpp's n_gpu_layers).
  std::vector<StackPart> parts(kv_.size());
  parts[0].ex = ex_.get();
  parts[0].kv = &kv_[0];
  parts[0].act = &act_;
  parts[0].bias = position_bias(c, model_->decoder, false);
  parts[0].cross = cross_kv_.get();
  for (StackPart& part : parts) part.tensor_prefix = c.spec.decoder_prefix;
  for (int64_t l = 0; l < c.n_layer - gpu.n_layers; l++) parts[0].layers.push_back(&model_->decoder.layers[size_t(l)]);
  if (gpu_ex_) {
    parts[1].ex = gpu_ex_.get();
    parts[1].first = c.n_layer - gpu.n_layers;
    parts[1].kv = &kv_[1];
    parts[1].act = &gpu_act_;
    for (const Layer& L : gpu.layers) parts[1].layers.push_back(&L);
  }
  const bool gpu_head = head_on_gpu();
  forward_decoder(*model_, parts[0], parts, gpu_head ? parts[1] : parts[0], model_->decoder.input,
                  gpu_head ? gpu.head_weights : model_->decoder.head, p, rope_, out, hidden, summary);
}

void Context::collect_input_stats(bool on, bool covariance, const std::vector<std::string>& covariance_tensors) {
  PE_CHECK(!on || !gpu_ex_, UnsupportedModelError,
           "input statistics (imatrix) are collected on the CPU only: load the model with n_gpu_layers=0");
  input_stats_ = InputStats{};
  input_stats_.covariance = covariance;
  for (const std::string& name : covariance_tensors) {
    const auto& tensors = model_->file().tensors();
    auto it = std::find_if(tensors.begin(), tensors.end(), [&](const auto& t) { return t.name == name; });
    PE_CHECK(it != tensors.end(), Error, "collect_input_stats: the model has no tensor named '", name, "'");
    input_stats_.covariance_only.insert(it->data);
  }
  act_.input_stats = on ? &input_stats_ : nullptr;
}

}  // namespace pe
