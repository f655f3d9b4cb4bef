// Text generation with a key/value cache: greedy, or sampling with temperature, top-k and top-p.
#pragma once

#include <graft/model.h>

#include <cstdint>
#include <functional>
#include <vector>

namespace graft {

struct GenerationOptions {
  std::int64_t max_new_tokens = 64;
  double temperature = 0.0;  ///< 0 = greedy (argmax)
  std::int64_t top_k = 0;    ///< keep the k most likely tokens; 0 = all
  double top_p = 1.0;        ///< keep the smallest set whose probability reaches top_p
  std::uint64_t seed = 0;    ///< sampling is reproducible for a given seed, on every device
  std::vector<std::int64_t> stop_ids;  ///< a row ends when it produces one of these
  bool use_cache = true;  ///< false recomputes the whole sequence each step (for checking)
};

/// Continues each row of `input_ids` [batch, seq] (left-padded, with `attention_mask` 1 for
/// tokens, 0 for padding; undefined = no padding). Returns the new tokens [batch, n], n <=
/// max_new_tokens; after a row's stop token its remaining entries are -1. `on_step` sees each
/// step's tokens [batch] as they are chosen.
at::Tensor generate(Model& model, const at::Tensor& input_ids, const at::Tensor& attention_mask,
                    const GenerationOptions& options,
                    const std::function<void(const at::Tensor&)>& on_step = {});

/// Chooses the next token from one row of logits [vocab] by the options' rule, drawing from
/// `state` (a 64-bit generator state advanced on each draw).
std::int64_t choose_token(const at::Tensor& logits, const GenerationOptions& options,
                          std::uint64_t& state);

}  // namespace graft
