#include "model/context.h"

#include <algorithm>

namespace pe {

int64_t Batch::n_logits() const { return int64_t(std::count(logits.begin(), logits.end(), uint8_t(1))); }

Context::Context(std::shared_ptr<const Model> model, std::shared_ptr<Executor> executor, int64_t n_ctx, int n_seq_max,
                 int64_t n_batch, GGMLType kv_type)
    : model_(std::move(model)),
      ex_(std::move(executor)),
      n_batch_(n_batch),
      kv_(*ex_, kv_type, int(model_->config().n_layer), int(model_->config().n_head_kv), int(model_->config().head_dim),
          n_seq_max, n_ctx),
      policy_(model_->config()),
      seqs_(size_t(n_seq_max)) {
  PE_CHECK(n_batch > 0, Error, "n_batch must be positive");
  act_.reserve(model_->config(), std::min<int64_t>(n_batch, n_ctx * n_seq_max), ex_->device());
}

void Context::seq_truncate(int seq, int64_t n) {
  auto lock = ex_->lock();
  kv_.seq_truncate(seq, n);
  policy_.truncate(seqs_[size_t(seq)], n);
}

void Context::seq_copy(int src, int dst) {
  auto lock = ex_->lock();
  kv_.seq_copy(src, dst);
  seqs_[size_t(dst)] = seqs_[size_t(src)];
}

void Context::clear() {
  auto lock = ex_->lock();
  kv_.clear();
  for (auto& s : seqs_) s = SequenceState{};
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
    PE_CHECK(kv_.seq_len(s) + count[size_t(s)] <= n_ctx(), ContextLengthError, "context overflow: ", kv_.seq_len(s),
             " tokens in the context + ", count[size_t(s)], " new > n_ctx ", n_ctx(),
             n_seq_max() > 1 ? str_cat(" (sequence ", s, ")") : std::string());
}

// A sequence whose bidirectional prefix ends in this batch, but whose earlier tokens were evaluated
// causally, is emptied and its tokens are put back ahead of its rows (without logits).
std::vector<Context::Row> Context::expand_replays(const Batch& batch) {
  std::vector<Row> rows;
  rows.reserve(size_t(batch.size()));
  std::vector<std::vector<int32_t>> incoming;
  if (model_->config().spec.mask == Mask::PrefixLM) {
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
        kv_.seq_truncate(s, 0);
        policy_.truncate(st, 0);
        for (int32_t t : history) rows.push_back(Row{t, s, false});
      }
    }
    rows.push_back(Row{batch.tokens[size_t(i)], s, batch.logits[size_t(i)] != 0});
  }
  return rows;
}

void Context::decode(const Batch& batch, float* logits, bool hidden) {
  auto lock = ex_->lock();
  check_rows(batch);
  std::vector<int64_t> old_len(seqs_.size());
  for (size_t s = 0; s < seqs_.size(); s++) old_len[s] = kv_.seq_len(int(s));
  const std::vector<Row> rows = expand_replays(batch);
  for (size_t s = 0; s < seqs_.size(); s++) old_len[s] = std::min(old_len[s], kv_.seq_len(int(s)));
  try {
    // Positions of the rows, and the sequences' tokens (which fix a bidirectional prefix).
    std::vector<int64_t> pos(rows.size());
    for (size_t r = 0; r < rows.size(); r++) {
      SequenceState& st = seqs_[size_t(rows[r].seq)];
      pos[r] = int64_t(st.tokens.size());
      policy_.append(st, &rows[r].token, 1);
    }
    const int64_t n = int64_t(rows.size());
    for (int64_t begin = 0; begin < n;) {
      int64_t end = std::min(n, begin + n_batch_);
      while (end < n && policy_.joins_next(seqs_[size_t(rows[size_t(end - 1)].seq)], pos[size_t(end - 1)])) {
        PE_CHECK(rows[size_t(end)].seq == rows[size_t(end - 1)].seq, Error, "batch: the bidirectional prefix of "
                 "sequence ", rows[size_t(end - 1)].seq, " must be consecutive rows");
        end++;
      }
      run_pass(rows.data() + begin, end - begin, logits, hidden);
      const int64_t width = hidden ? model_->config().n_embd : model_->config().n_vocab;
      if (logits)
        for (int64_t r = begin; r < end; r++) logits += rows[size_t(r)].logits ? width : 0;
      begin = end;
    }
  } catch (...) {
    for (size_t s = 0; s < seqs_.size(); s++) {
      if (kv_.seq_len(int(s)) > old_len[s]) kv_.seq_truncate(int(s), old_len[s]);
      if (int64_t(seqs_[s].tokens.size()) > old_len[s]) policy_.truncate(seqs_[s], old_len[s]);
    }
    throw;
  }
}

void Context::run_pass(const Row* rows, int64_t n, float* logits, bool hidden) {
  RowPlan& p = plan_;
  p.clear();
  for (int64_t r = 0; r < n; r++) {
    const int32_t s = rows[r].seq;
    const int64_t pos = kv_.seq_len(s);
    kv_.seq_extend(s, 1);
    const RowPlace place = policy_.place(seqs_[size_t(s)], pos);
    p.token.push_back(rows[r].token);
    p.seq.push_back(s);
    p.rope_pos.push_back(place.rope_pos);
    p.rope_pos2.push_back(place.rope_pos2);
    p.key_begin.push_back(place.key_begin);
    p.key_end.push_back(place.key_end);
    p.slot.push_back(kv_.slot(s, pos));
    if (rows[r].logits) p.logit_rows.push_back(int32_t(r));
  }
  act_.reserve(model_->config(), n, ex_->device());
  const int64_t width = hidden ? model_->config().n_embd : model_->config().n_vocab;
  const Tensor out = logits && !p.logit_rows.empty()
                         ? f32_tensor(logits, int64_t(p.logit_rows.size()), width, width)
                         : Tensor{};
  forward_decoder(*ex_, *model_, kv_, p, act_, out, hidden);
}

}  // namespace pe
