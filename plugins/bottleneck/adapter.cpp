#include "adapter.h"

#include <cmath>

namespace graft::plugins::adapters {

AdapterConfig AdapterConfig::from_params(const Params& p, AdapterConfig c,
                                         const std::vector<std::string>& default_targets,
                                         const std::vector<std::string>& extra_keys) {
  std::vector<std::string> keys = {"reduction_factor", "non_linearity", "init",     "scaling",
                                   "dropout",          "ln_before",     "ln_after", "gating"};
  keys.insert(keys.end(), extra_keys.begin(), extra_keys.end());
  check_method_keys(p, keys);
  if (p.has("reduction_factor")) {
    c.reduction_factor = p.at("reduction_factor").as_double();
    if (!(c.reduction_factor >= 1))
      p.at("reduction_factor")
          .fail("expected a number >= 1, got \"" + p.at("reduction_factor").text() + "\"");
  }
  c.non_linearity =
      p.get_choice("non_linearity", {"relu", "gelu", "silu", "swish", "tanh"}, c.non_linearity);
  c.init = p.get_choice("init", {"bert", "mam", "houlsby"}, c.init);
  c.scaling = p.get_double("scaling", c.scaling);
  if (p.has("dropout")) c.dropout = p.at("dropout").as_probability();
  c.ln_before = p.get_bool("ln_before", c.ln_before);
  c.ln_after = p.get_bool("ln_after", c.ln_after);
  c.gating = p.get_bool("gating", c.gating);
  c.selection = Selection::from_params(p, default_targets);
  return c;
}

nlohmann::json AdapterConfig::to_json() const {
  nlohmann::json j = {{"reduction_factor", reduction_factor},
                      {"non_linearity", non_linearity},
                      {"init", init},
                      {"scaling", scaling},
                      {"dropout", dropout},
                      {"ln_before", ln_before},
                      {"ln_after", ln_after},
                      {"gating", gating}};
  j.update(selection.to_json());
  return j;
}

std::int64_t AdapterConfig::width(const Site& site, const std::string& method) const {
  const auto k = static_cast<std::int64_t>(std::floor(site.out_features / reduction_factor));
  if (k < 1)
    throw Error(method + ": site '" + site.name + "' has width " +
                std::to_string(site.out_features) + ", too narrow for reduction_factor " +
                std::to_string(reduction_factor));
  return k;
}

bool is_sublayer_point(const std::string& point) {
  return point == "attn.out" || point == "ffn.out" || point == "attn.in" || point == "ffn.in";
}

Adapter::Adapter(const AdapterConfig& c, std::int64_t d, std::int64_t k, bool dense) : c_(c) {
  if (dense) {
    down_weight = register_parameter("down_weight", torch::empty({k, d}));
    down_bias = register_parameter("down_bias", torch::zeros({k}));
    up_weight = register_parameter("up_weight", torch::empty({d, k}));
    up_bias = register_parameter("up_bias", torch::zeros({d}));
    torch::NoGradGuard no_grad;
    if (c.init == "bert") {  // AdapterHub's default: N(0, 0.02), biases 0
      down_weight.normal_(0.0, 0.02);
      up_weight.normal_(0.0, 0.02);
    } else if (c.init == "houlsby") {  // truncated normal, std 1e-2, cut at two deviations
      for (auto* w : {&down_weight, &up_weight}) {
        w->normal_(0.0, 1e-2);
        w->clamp_(-2e-2, 2e-2);
      }
    } else {  // mam: down Kaiming-uniform (a = sqrt(5)), up 0: an exact no-op at the start
      const double bound = 1.0 / std::sqrt(static_cast<double>(d));
      down_weight.uniform_(-bound, bound);
      up_weight.zero_();
    }
  }
  if (c.ln_before)
    ln_before =
        register_module("ln_before", torch::nn::LayerNorm(torch::nn::LayerNormOptions({d})));
  if (c.ln_after)
    ln_after = register_module("ln_after", torch::nn::LayerNorm(torch::nn::LayerNormOptions({d})));
  if (c.gating) gate = register_module("gate", torch::nn::Linear(d, 1));
  drop = register_module("dropout", torch::nn::Dropout(c.dropout));
}

at::Tensor Adapter::transform(const at::Tensor& out, const at::Tensor& in) {
  const auto& x = c_.reads_input ? in : out;
  // In the activations' dtype (bfloat16 models), the float32 parameters cast to it.
  auto norm = [&](torch::nn::LayerNorm& ln, const at::Tensor& t) {
    return torch::layer_norm(t, {t.size(-1)}, ln->weight.to(t.dtype()), ln->bias.to(t.dtype()),
                             ln->options.eps());
  };
  auto h = c_.dropout > 0 ? drop(x) : x;
  if (ln_before) h = norm(ln_before, h);
  h = down(h);
  if (c_.non_linearity == "relu") {
    h = torch::relu(h);
  } else if (c_.non_linearity == "gelu") {
    h = torch::gelu(h);
  } else if (c_.non_linearity == "tanh") {
    h = torch::tanh(h);
  } else {
    h = torch::silu(h);
  }
  h = up(h);
  if (ln_after) h = norm(ln_after, h);
  h = h * c_.scaling;
  if (gate)  // [batch, 1, 1]
    h = h * torch::sigmoid(torch::linear(x, gate->weight.to(x.dtype()), gate->bias.to(x.dtype())))
                .mean(1, true);
  return out + h.to(out.dtype());
}

}  // namespace graft::plugins::adapters
