#include "model/sequence.h"

#include <algorithm>

namespace pe {

bool SequencePolicy::needs_replay(const SequenceState& s, const int32_t* tokens, int64_t n) const {
  if (c_.spec.mask == Mask::Bidirectional) return !s.tokens.empty() && n > 0;  // every key changes
  return c_.spec.mask == Mask::PrefixLM && s.prefix_len < 0 && !s.tokens.empty() &&
         std::find(tokens, tokens + n, int32_t(c_.prefix_end_token)) != tokens + n;
}

void SequencePolicy::append(SequenceState& s, const int32_t* tokens, int64_t n) const {
  const int64_t start = int64_t(s.tokens.size());
  s.tokens.insert(s.tokens.end(), tokens, tokens + n);
  if (c_.spec.mask != Mask::PrefixLM || s.prefix_len >= 0) return;
  const auto end = std::find(s.tokens.begin() + start, s.tokens.end(), int32_t(c_.prefix_end_token));
  if (end == s.tokens.end()) return;
  s.prefix_len = end - s.tokens.begin();
  if (c_.spec.positions == Positions::Rope2D) {
    const auto mask = std::find(s.tokens.begin(), end, int32_t(c_.mask_token));
    // No mask token: generate as if it were just before BOS, where THUDM's prompts put [gMASK].
    s.mask_pos = mask != end ? mask - s.tokens.begin() : s.prefix_len - 1;
  }
}

void SequencePolicy::truncate(SequenceState& s, int64_t n) const {
  s.tokens.resize(size_t(n));
  if (s.prefix_len >= n) s.prefix_len = s.mask_pos = -1;
}

RowPlace SequencePolicy::place(const SequenceState& s, int64_t pos) const {
  RowPlace r;
  r.key_end = int32_t(pos + 1);
  if (c_.spec.mask == Mask::PrefixLM && pos < s.prefix_len) r.key_end = int32_t(s.prefix_len);
  if (c_.spec.mask == Mask::Bidirectional) r.key_end = int32_t(s.tokens.size());
  r.key_begin_window = r.key_begin;
  if (c_.sliding_window > 0 && r.key_end > c_.sliding_window)
    r.key_begin_window = int32_t(r.key_end - c_.sliding_window);
  r.rope_pos = int32_t(pos);
  if (c_.spec.positions == Positions::Rope2D && s.prefix_len >= 0 && pos >= s.prefix_len) {
    // THUDM's get_position_ids: generated tokens keep the mask token's position and count blocks.
    r.rope_pos = int32_t(s.mask_pos);
    r.rope_pos2 = int32_t(pos - s.prefix_len + 1);
  }
  return r;
}

}  // namespace pe
