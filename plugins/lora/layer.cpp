#include "layer.h"

#include <cmath>

namespace graft::plugins::lora {

void init_a(at::Tensor& A, bool gaussian) {
  torch::NoGradGuard no_grad;
  if (gaussian) {
    A.normal_(0.0, 1.0 / static_cast<double>(A.size(0)));
  } else {
    const double bound = 1.0 / std::sqrt(static_cast<double>(A.size(1)));
    A.uniform_(-bound, bound);
  }
}

LoraDelta::LoraDelta(std::int64_t in, std::int64_t out, std::int64_t r, double scaling_, double p,
                     bool gaussian, bool gating)
    : scaling(scaling_) {
  A = register_parameter("lora_A", torch::empty({r, in}));
  B = register_parameter("lora_B", torch::zeros({out, r}));
  init_a(A, gaussian);
  dropout = register_module("dropout", torch::nn::Dropout(p));
  if (gating) gate = register_module("gate", torch::nn::Linear(in, 1));
}

at::Tensor LoraDelta::delta(const at::Tensor& x, const LinearImpl&) {
  auto h = dropout->options.p() > 0 ? dropout(x) : x;
  auto y = torch::linear(torch::linear(h, A.to(x.dtype())), B.to(x.dtype()));
  // A gate replaces the scaling (AdapterHub's gated LoRA, as in UniPELT).
  if (gate)
    return y * torch::sigmoid(gate(x.to(gate->weight.dtype()))).mean(-2, true).to(y.dtype());
  return y * scaling;
}

at::Tensor LoraDelta::delta_weight(const LinearImpl&) {
  if (gate) return {};
  return torch::matmul(B, A) * scaling;
}

DoraTransform::DoraTransform(const LinearImpl& site, std::int64_t r, double scaling_, bool gaussian)
    : scaling(scaling_) {
  A = register_parameter("lora_A", torch::empty({r, site.in_features}));
  B = register_parameter("lora_B", torch::zeros({site.out_features, r}));
  init_a(A, gaussian);
  // The weight the site uses: a quantised base (QDoRA) starts from its dequantised weight.
  auto norms = site.effective_weight().detach().to(torch::kFloat).norm(2, 1);
  magnitude = register_parameter("lora_magnitude", norms.clone());
}

at::Tensor DoraTransform::transform(const at::Tensor& weight, const LinearImpl&) {
  auto combined = weight + torch::matmul(B, A).to(weight.dtype()) * scaling;
  auto norm = combined.norm(2, 1, true).detach();
  return combined * (magnitude.to(weight.dtype()).unsqueeze(1) / norm);
}

}  // namespace graft::plugins::lora
