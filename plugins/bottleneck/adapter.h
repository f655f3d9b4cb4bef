// The bottleneck adapter module shared by the adapter plugins (bottleneck, parallel, compacter),
// computing exactly what AdapterHub's Adapter and ParallelAdapter compute. It sits in the residual
// step after a sublayer (attn.out, ffn.out): h is the sublayer's output, x the residual stream
// (the sublayer's input before any pre-norm), LN the layer's post-norm (BERT; none in pre-norm
// families), and
//   A(u)  = gate(u) * dropout(up(f(down(LN_before(u)))) * scaling)
// sequential:
//   r = h (residual_before_ln: true), u = h;  original_ln_before: u = h + x, r = u (post_add),
//   u = LN(u);  r = u (residual_before_ln: false)
//   o = LN_after(A(u) + r)   (adapter_residual_before_ln: true)   or   LN_after(A(u)) + r
// parallel:
//   o = h + LN_after(A(x))
// then, with original_ln_after, the model's own step: LN(o + x), or o + x without a post-norm;
// without it, o is the layer's output. The gate (UniPELT) is sigmoid(Linear(d, 1)(u)) averaged
// over the sequence, one per row. Stacked adapters at one site run in attach order.
#pragma once

#include <graft/adapterhub.h>
#include <graft/hooks.h>
#include <graft/method.h>
#include <graft/params.h>
#include <torch/torch.h>

#include <memory>
#include <string>
#include <vector>

namespace graft::plugins::adapters {

struct AdapterConfig {
  double reduction_factor = 16;
  std::string non_linearity = "relu";  ///< relu, gelu, gelu_new, silu (swish), tanh, leakyrelu
  std::string init = "bert";           ///< bert, mam, houlsby
  double scaling = 1.0;                ///< a fixed scale, or the start of a learned one
  std::string scaling_mode = "fixed";  ///< fixed, learned (one scalar), channel (one per width)
  double dropout = 0.0;
  bool ln_before = false, ln_after = false;
  bool gating = false;
  bool parallel = false;  ///< reads the residual stream, added beside the sublayer
  bool original_ln_before = true, original_ln_after = true;
  std::string residual_before_ln = "true";  ///< true, false, post_add
  bool adapter_residual_before_ln = false;
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
class Adapter : public ResidualTransform {
 public:
  Adapter(const AdapterConfig& c, std::int64_t d, std::int64_t k, bool dense = true);
  at::Tensor transform(const at::Tensor& out, const at::Tensor& residual,
                       const Norm* norm) override;
  bool closes() const override { return !c_.original_ln_after; }

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
  at::Tensor scale;                                       ///< learned scaling: [1] or [d]

 private:
  at::Tensor bottleneck(const at::Tensor& u);
  AdapterConfig c_;
  torch::nn::LayerNorm ln_before{nullptr}, ln_after{nullptr};
  torch::nn::Linear gate{nullptr};
  torch::nn::Dropout drop{nullptr};
};

/// A method of sequential or parallel adapters at the selected sublayer outputs (the bottleneck,
/// pfeiffer, houlsby and parallel methods).
class Bottleneck : public HookMethod {
 public:
  Bottleneck(std::string name, AdapterConfig c) : name_(std::move(name)), c_(std::move(c)) {}
  std::string name() const override { return name_; }
  nlohmann::json config() const override { return c_.to_json(); }
  void attach(Model& model) override;
  const AdapterConfig& settings() const { return c_; }

 private:
  std::string name_;
  AdapterConfig c_;
};

/// AdapterHub's bottleneck parts (no PHM layers) as a "bottleneck" method, and the other way.
bool reads_bottleneck_part(const nlohmann::json& part);
std::vector<std::unique_ptr<Method>> read_bottleneck_part(const nlohmann::json& part,
                                                          const std::string& name,
                                                          io::TensorMap& tensors, Model& model,
                                                          const std::string& source);
std::pair<nlohmann::json, io::TensorMap> write_bottleneck_part(Method& method, const Model& model,
                                                               const std::string& name);

/// The site points a bottleneck adapter sits at: attn.out and ffn.out.
bool is_sublayer_point(const std::string& point);

/// AdapterHub: the settings of a bottleneck configuration part (SeqBn, DoubleSeqBn, ParBn, ...;
/// phm_layer parts too, whose PHM keys compacter reads: they configure PHM layers, which other
/// parts do not have) as graft's keys, with its sites (mh_adapter: attn.out, output_adapter:
/// ffn.out, leave_out). Errors name `source`.
Params bottleneck_settings(const nlohmann::json& part, const std::string& source);

/// Name pairs (graft parameter at a site, AdapterHub name after ".adapters.<name>.") of a
/// bottleneck adapter: its projections (`dense`: plain linear ones; compacter adds its PHM
/// tensors), layer norms, gate and learned scaling.
using NamePairs = std::vector<std::pair<std::string, std::string>>;
NamePairs hub_names(const AdapterConfig& c, bool dense);
/// The index of the down projection inside AdapterHub's adapter_down (1 after ln_before's norm).
std::string down_index(const AdapterConfig& c);

/// Reading: takes from `tensors` (AdapterHub names) the tensor of every key of `state` (an
/// attached method's state, graft names "<site>.<parameter>") and returns them by graft name.
io::TensorMap from_hub(io::TensorMap& tensors, const std::string& name, const io::TensorMap& state,
                       const Model& model, const NamePairs& names, const std::string& source);
/// Writing: `state` by AdapterHub names.
io::TensorMap to_hub(const io::TensorMap& state, const std::string& name, const Model& model,
                     const NamePairs& names);

/// The part a graft adapter's settings write as (AdapterHub's bottleneck keys; compacter adds
/// its PHM keys). Settings AdapterHub has no key for are an error naming `method`.
nlohmann::json bottleneck_part(const AdapterConfig& c, const Model& model,
                               const std::string& method);

}  // namespace graft::plugins::adapters
