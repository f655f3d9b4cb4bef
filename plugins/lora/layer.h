// LoRA's hooks: y += s * B A dropout(x) as a linear delta, and DoRA as a weight transform.
#pragma once

#include <graft/hooks.h>
#include <graft/model.h>
#include <torch/torch.h>

namespace graft::plugins::lora {

/// A: [r, in] (lora_A), B: [out, r] (lora_B); delta = scaling * B A dropout(x), or with a gate
/// (UniPELT, as AdapterHub computes it) gate(x) * B A dropout(x) without the scaling.
class LoraDelta : public LinearDelta {
 public:
  LoraDelta(std::int64_t in, std::int64_t out, std::int64_t r, double scaling, double dropout,
            bool gaussian, bool gating = false);
  at::Tensor delta(const at::Tensor& x, const LinearImpl& site) override;
  /// s B A; undefined with a gate (the gate depends on the input: not mergeable).
  at::Tensor delta_weight(const LinearImpl& site) override;

  at::Tensor A, B;
  double scaling;
  torch::nn::Dropout dropout{nullptr};
  torch::nn::Linear gate{nullptr};  ///< UniPELT's gate over the sequence, when gating
};

/// DoRA: W' = m * (W + s B A) / ||W + s B A|| with the norm taken per output row and treated as
/// a constant in backpropagation (as in the paper and peft); m (lora_magnitude, [out]) starts at
/// the base weight's row norms, so the model is unchanged at initialisation.
class DoraTransform : public WeightTransform {
 public:
  DoraTransform(const LinearImpl& site, std::int64_t r, double scaling, bool gaussian);
  at::Tensor transform(const at::Tensor& weight, const LinearImpl& site) override;
  bool mergeable() const override { return true; }

  at::Tensor A, B, magnitude;
  double scaling;
};

/// Initialises A as peft does: Kaiming-uniform with a = sqrt(5) (bound 1/sqrt(in)), or, with
/// `gaussian`, normal with standard deviation 1/r.
void init_a(at::Tensor& A, bool gaussian);

}  // namespace graft::plugins::lora
