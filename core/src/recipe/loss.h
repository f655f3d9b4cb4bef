// The language-modelling loss the trainer, the evaluator and the benchmarks compute: next-token
// cross-entropy over a model's LM head.
#pragma once

#include <graft/data.h>
#include <graft/model.h>
#include <torch/types.h>

#include <cstdint>

namespace graft {

struct LossParts {
  at::Tensor loss;       ///< mean over the batch's targets (a scalar with a graph when training)
  std::int64_t targets;  ///< tokens scored
  at::Tensor sum;        ///< the sum over the targets (loss is sum / targets)
};

/// The targets causal_lm_loss scores in a batch: labels[:, 1:] other than -100.
std::int64_t causal_lm_targets(const Batch& batch);

/// The mean cross-entropy of predicting labels[:, t + 1] from position t (labels of -100 are not
/// scored) through the model's head. A plain head (no bias; hooks that only transform its
/// weight) is computed here `chunk_rows` rows at a time (0: as many as make 2^23 logits), with
/// its gradient worked out while each chunk is at hand: the [tokens, vocabulary] logits and their
/// gradient are never held whole. Any other head runs its own forward on all rows.
LossParts causal_lm_loss(Model& model, const Batch& batch, std::int64_t chunk_rows = 0);

/// Evaluation: the summed cross-entropy, how many targets the argmax predicts, and how many were
/// scored; chunked as above whatever the head. No graph is built.
struct LmScore {
  double loss_sum = 0;
  std::int64_t correct = 0, scored = 0;
};
LmScore score_causal_lm(Model& model, const Batch& batch, std::int64_t chunk_rows = 0);

/// Mixed precision for the scope of the object: with `bf16`, matrix products and the other
/// operations libtorch's autocast lists run in bfloat16 on `device`, while parameters (the
/// master weights), norms, softmax and the loss stay float32. Wrap the forward and the loss,
/// not the backward (autograd replays the casts). Does nothing without `bf16`.
class Autocast {
 public:
  Autocast(bool bf16, const torch::Device& device);
  ~Autocast();
  Autocast(const Autocast&) = delete;
  Autocast& operator=(const Autocast&) = delete;

 private:
  bool on_ = false, cuda_ = false, was_enabled_ = false;
  at::ScalarType was_dtype_ = at::kFloat;
};

}  // namespace graft
