// What a context keeps per sequence besides its keys and values, and the architecture's position and
// mask policy that reads it: where each new token sits (its RoPE positions) and which keys it sees.
#pragma once
#include <cstdint>
#include <vector>

#include "model/config.h"

namespace pe {

struct SequenceState {
  std::vector<int32_t> tokens;  // every token in the cache, in order
  int64_t prefix_len = -1;      // Mask::PrefixLM: index of the prefix-end token; -1 until one arrives
  int64_t mask_pos = -1;        // Positions::Rope2D: the generation position id
};

// Where the token at one position of a sequence sits.
struct RowPlace {
  int32_t rope_pos = 0;
  int32_t rope_pos2 = 0;  // Rope2D: the block position
  int32_t key_begin = 0;  // visible keys [key_begin, key_end) of the sequence
  int32_t key_end = 0;
  int32_t key_begin_window = 0;  // the first key a windowed layer sees (ModelConfig::sliding_window)
};

class SequencePolicy {
 public:
  explicit SequencePolicy(const ModelConfig& c) : c_(c) {}

  // Whether appending `tokens` to `s` starts a bidirectional prefix that tokens already in the cache
  // belong to: they were evaluated causally, so the sequence must be evaluated again from its start.
  bool needs_replay(const SequenceState& s, const int32_t* tokens, int64_t n) const;
  // Records appended tokens; the prefix-end token fixes the prefix and the generation position.
  void append(SequenceState& s, const int32_t* tokens, int64_t n) const;
  void truncate(SequenceState& s, int64_t n) const;
  RowPlace place(const SequenceState& s, int64_t pos) const;
  // Whether the row at `pos` must be in the same forward pass as the next row of its sequence (a
  // bidirectional prefix is evaluated in one pass: each of its rows sees all the others).
  bool joins_next(const SequenceState& s, int64_t pos) const {
    if (c_.spec.mask == Mask::Bidirectional) return pos + 1 < int64_t(s.tokens.size());
    return c_.spec.mask == Mask::PrefixLM && pos + 1 < s.prefix_len;
  }

 private:
  const ModelConfig& c_;
};

}  // namespace pe
