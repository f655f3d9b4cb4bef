// The bottleneck adapter module shared by the adapter plugins (bottleneck, parallel, compacter):
//   h  = x                       (the sublayer's output; its input for a parallel adapter)
//   z  = up(f(down(LN_before(dropout(h)))))
//   z  = LN_after(z) * scaling * gate(h)
//   out <- out + z
// The gate (UniPELT) is sigmoid(Linear(d, 1)(h)) averaged over the sequence, one per row.
#pragma once

#include <graft/hooks.h>
#include <graft/method.h>
#include <graft/params.h>
#include <torch/torch.h>

#include <string>

namespace graft::plugins::adapters {

struct AdapterConfig {
  double reduction_factor = 16;
  std::string non_linearity = "relu";  ///< relu, gelu, silu (swish), tanh
  std::string init = "bert";           ///< bert, mam, houlsby
  double scaling = 1.0;
  double dropout = 0.0;
  bool ln_before = false, ln_after = false;
  bool gating = false;
  bool reads_input = false;  ///< parallel: the adapter reads the sublayer's input
  Selection selection;

  /// Reads the keys shared by every adapter plugin over `defaults` (a preset's values).
  static AdapterConfig from_params(const Params& p, AdapterConfig defaults,
                                   const std::vector<std::string>& default_targets,
                                   const std::vector<std::string>& extra_keys = {});
  nlohmann::json to_json() const;
  /// The bottleneck width for a site of width d: d / reduction_factor, at least 1.
  std::int64_t width(const Site& site, const std::string& method) const;
};

/// A sequential or parallel adapter at one sublayer site. Subclasses may replace the two
/// projections (compacter's PHM layers).
class Adapter : public SublayerTransform {
 public:
  Adapter(const AdapterConfig& c, std::int64_t d, std::int64_t k, bool dense = true);
  at::Tensor transform(const at::Tensor& out, const at::Tensor& in) override;

 protected:
  // The parameters stay float32; the adapter computes in the dtype of the model's activations.
  virtual at::Tensor down(const at::Tensor& h) {
    return torch::linear(h, down_weight.to(h.dtype()), down_bias.to(h.dtype()));
  }
  virtual at::Tensor up(const at::Tensor& h) {
    return torch::linear(h, up_weight.to(h.dtype()), up_bias.to(h.dtype()));
  }

 public:
  at::Tensor down_weight, down_bias, up_weight, up_bias;  ///< [k, d], [k], [d, k], [d]

 private:
  AdapterConfig c_;
  torch::nn::LayerNorm ln_before{nullptr}, ln_after{nullptr};
  torch::nn::Linear gate{nullptr};
  torch::nn::Dropout drop{nullptr};
};

/// The site points a bottleneck adapter may sit at.
bool is_sublayer_point(const std::string& point);

}  // namespace graft::plugins::adapters
