#include "adapter.h"

#include <graft/error.h>

#include <cmath>

namespace graft::plugins::adapters {
namespace {

const std::vector<std::string> kNonLinearities = {"relu",  "gelu", "gelu_new",  "silu",
                                                  "swish", "tanh", "leakyrelu", "sigmoid"};

at::Tensor activate(const at::Tensor& h, const std::string& f) {
  if (f == "relu") return torch::relu(h);
  if (f == "gelu") return torch::gelu(h);
  if (f == "gelu_new") {  // transformers' tanh approximation
    const double c = std::sqrt(2.0 / M_PI);
    return 0.5 * h * (1.0 + torch::tanh(c * (h + 0.044715 * torch::pow(h, 3.0))));
  }
  if (f == "tanh") return torch::tanh(h);
  if (f == "leakyrelu") return torch::leaky_relu(h, 0.01);
  if (f == "sigmoid") return torch::sigmoid(h);
  return torch::silu(h);  // silu, swish
}

}  // namespace

AdapterConfig AdapterConfig::from_params(const Params& p, AdapterConfig c,
                                         const std::vector<std::string>& default_targets,
                                         const std::vector<std::string>& extra_keys) {
  std::vector<std::string> keys = {"reduction_factor",
                                   "non_linearity",
                                   "init",
                                   "scaling",
                                   "dropout",
                                   "ln_before",
                                   "ln_after",
                                   "gating",
                                   "parallel",
                                   "original_ln_before",
                                   "original_ln_after",
                                   "residual_before_ln",
                                   "adapter_residual_before_ln"};
  keys.insert(keys.end(), extra_keys.begin(), extra_keys.end());
  check_method_keys(p, keys);
  if (p.has("reduction_factor")) {
    c.reduction_factor = p.at("reduction_factor").as_double();
    if (!(c.reduction_factor >= 1))
      p.at("reduction_factor")
          .fail("expected a number >= 1, got \"" + p.at("reduction_factor").text() + "\"");
  }
  c.non_linearity = p.get_choice("non_linearity", kNonLinearities, c.non_linearity);
  c.init = p.get_choice("init", {"bert", "mam", "houlsby"}, c.init);
  if (p.has("scaling")) {
    const auto text = p.at("scaling").text();
    if (text == "learned" || text == "channel") {
      c.scaling_mode = text;
      c.scaling = 1.0;
    } else {
      c.scaling_mode = "fixed";
      c.scaling = p.get_double("scaling", c.scaling);
    }
  }
  if (p.has("dropout")) c.dropout = p.at("dropout").as_probability();
  c.ln_before = p.get_bool("ln_before", c.ln_before);
  c.ln_after = p.get_bool("ln_after", c.ln_after);
  c.gating = p.get_bool("gating", c.gating);
  c.parallel = p.get_bool("parallel", c.parallel);
  c.original_ln_before = p.get_bool("original_ln_before", c.original_ln_before);
  c.original_ln_after = p.get_bool("original_ln_after", c.original_ln_after);
  c.residual_before_ln =
      p.get_choice("residual_before_ln", {"true", "false", "post_add"}, c.residual_before_ln);
  c.adapter_residual_before_ln =
      p.get_bool("adapter_residual_before_ln", c.adapter_residual_before_ln);
  c.selection = Selection::from_params(p, default_targets);
  return c;
}

nlohmann::json AdapterConfig::to_json() const {
  nlohmann::json j = {{"reduction_factor", reduction_factor},
                      {"non_linearity", non_linearity},
                      {"init", init},
                      {"dropout", dropout},
                      {"ln_before", ln_before},
                      {"ln_after", ln_after},
                      {"gating", gating},
                      {"parallel", parallel},
                      {"original_ln_before", original_ln_before},
                      {"original_ln_after", original_ln_after},
                      {"residual_before_ln", residual_before_ln},
                      {"adapter_residual_before_ln", adapter_residual_before_ln}};
  if (scaling_mode == "fixed")
    j["scaling"] = scaling;
  else
    j["scaling"] = scaling_mode;
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
  return point == "attn.out" || point == "ffn.out";
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
  if (c.scaling_mode != "fixed")
    scale = register_parameter("scale", torch::ones({c.scaling_mode == "channel" ? d : 1}));
  if (c.ln_before)
    ln_before =
        register_module("ln_before", torch::nn::LayerNorm(torch::nn::LayerNormOptions({d})));
  if (c.ln_after)
    ln_after = register_module("ln_after", torch::nn::LayerNorm(torch::nn::LayerNormOptions({d})));
  if (c.gating) {
    gate = register_module("gate", torch::nn::Linear(d, 1));
    torch::NoGradGuard no_grad;  // AdapterHub initialises the gate as BERT does
    gate->weight.normal_(0.0, 0.02);
    gate->bias.zero_();
  }
  drop = register_module("dropout", torch::nn::Dropout(c.dropout));
}

// A(u) as the header writes it, before the residual.
at::Tensor Adapter::bottleneck(const at::Tensor& u) {
  // In the activations' dtype (bfloat16 models), the float32 parameters cast to it.
  auto norm = [&](torch::nn::LayerNorm& ln, const at::Tensor& t) {
    return torch::layer_norm(t, {t.size(-1)}, ln->weight.to(t.dtype()), ln->bias.to(t.dtype()),
                             ln->options.eps());
  };
  auto h = ln_before ? norm(ln_before, u) : u;
  h = up(activate(down(h), c_.non_linearity));
  h = scale.defined() ? h * scale.to(h.dtype()) : h * c_.scaling;
  if (c_.dropout > 0) h = drop(h);
  if (gate)  // [batch, 1, 1]
    h = h * torch::sigmoid(torch::linear(u, gate->weight.to(u.dtype()), gate->bias.to(u.dtype())))
                .mean(1, true);
  if (c_.parallel) return ln_after ? norm(ln_after, h) : h;
  return h;
}

at::Tensor Adapter::transform(const at::Tensor& out, const at::Tensor& residual_stream,
                              const Norm* norm) {
  const auto x = residual_stream.to(out.dtype());
  if (c_.parallel) return out + bottleneck(x);
  at::Tensor residual = c_.residual_before_ln == "true" ? out : at::Tensor();
  auto u = out;
  if (c_.original_ln_before) {
    u = out + x;
    if (c_.residual_before_ln == "post_add") residual = u;
    if (norm) u = (*norm)(u);
  }
  if (!residual.defined()) residual = u;
  auto h = bottleneck(u);
  auto layer_norm = [&](const at::Tensor& t) {
    return torch::layer_norm(t, {t.size(-1)}, ln_after->weight.to(t.dtype()),
                             ln_after->bias.to(t.dtype()), ln_after->options.eps());
  };
  if (c_.adapter_residual_before_ln) h = h + residual;
  if (ln_after) h = layer_norm(h);
  if (!c_.adapter_residual_before_ln) h = h + residual;
  return h;
}

// ---- AdapterHub ----------------------------------------------------------------------------

std::string down_index(const AdapterConfig& c) { return c.ln_before ? "1" : "0"; }

NamePairs hub_names(const AdapterConfig& c, bool dense) {
  NamePairs out;
  const auto down = "adapter_down." + down_index(c) + ".";
  if (dense)
    out = {{"down_weight", down + "weight"},
           {"down_bias", down + "bias"},
           {"up_weight", "adapter_up.weight"},
           {"up_bias", "adapter_up.bias"}};
  if (c.ln_before) {
    out.push_back({"ln_before.weight", "adapter_down.0.weight"});
    out.push_back({"ln_before.bias", "adapter_down.0.bias"});
  }
  if (c.ln_after) {
    out.push_back({"ln_after.weight", "adapter_norm_after.weight"});
    out.push_back({"ln_after.bias", "adapter_norm_after.bias"});
  }
  if (c.gating) {
    out.push_back({"gate.weight", "gate.weight"});
    out.push_back({"gate.bias", "gate.bias"});
  }
  if (c.scaling_mode != "fixed") out.push_back({"scale", "scaling"});
  return out;
}

namespace {

// The graft key -> AdapterHub key of every tensor of an attached bottleneck adapter.
std::vector<std::pair<std::string, std::string>> key_pairs(const io::TensorMap& state,
                                                           const std::string& name,
                                                           const Model& model,
                                                           const NamePairs& names) {
  std::vector<std::pair<std::string, std::string>> out;
  for (const auto& site : model.sites()) {
    if (!is_sublayer_point(site.point)) continue;
    const auto hub =
        adapterhub::bottleneck_location(model.config(), site) + ".adapters." + name + ".";
    for (const auto& [param, suffix] : names)
      if (state.count(site.name + "." + param))
        out.emplace_back(site.name + "." + param, hub + suffix);
  }
  return out;
}

}  // namespace

io::TensorMap from_hub(io::TensorMap& tensors, const std::string& name, const io::TensorMap& state,
                       const Model& model, const NamePairs& names, const std::string& source) {
  io::TensorMap out;
  for (const auto& [graft_key, hub_key] : key_pairs(state, name, model, names)) {
    out[graft_key] = adapterhub::take(tensors, hub_key, source);
    // AdapterHub's ln_before norm is also registered as adapter_norm_before: the same tensor.
    const auto at = hub_key.find("adapter_down.0.");
    if (graft_key.find(".ln_before.") != std::string::npos && at != std::string::npos) {
      const auto alias = hub_key.substr(0, at) + "adapter_norm_before." + hub_key.substr(at + 15);
      auto it = tensors.find(alias);
      if (it != tensors.end()) {
        if (!torch::equal(it->second, out[graft_key]))
          throw FileError(source, "'" + alias + "' differs from '" + hub_key +
                                      "', which AdapterHub holds as one tensor");
        tensors.erase(it);
      }
    }
  }
  if (out.size() != state.size())
    for (const auto& [key, t] : state)
      if (!out.count(key))
        throw Error("AdapterHub format: graft tensor '" + key + "' has no AdapterHub name");
  return out;
}

io::TensorMap to_hub(const io::TensorMap& state, const std::string& name, const Model& model,
                     const NamePairs& names) {
  io::TensorMap out;
  for (const auto& [graft_key, hub_key] : key_pairs(state, name, model, names)) {
    out[hub_key] = state.at(graft_key);
    const auto at = hub_key.find("adapter_down.0.");
    if (graft_key.find(".ln_before.") != std::string::npos && at != std::string::npos)
      out[hub_key.substr(0, at) + "adapter_norm_before." + hub_key.substr(at + 15)] =
          state.at(graft_key).clone();
  }
  if (out.size() < state.size())
    for (const auto& [key, t] : state)
      if (key_pairs({{key, t}}, name, model, names).empty())
        throw Error("AdapterHub format: graft tensor '" + key + "' has no AdapterHub name");
  return out;
}

Params bottleneck_settings(const nlohmann::json& part, const std::string& source) {
  const std::vector<std::string> handled = {"reduction_factor",
                                            "non_linearity",
                                            "scaling",
                                            "ln_before",
                                            "ln_after",
                                            "use_gating",
                                            "is_parallel",
                                            "original_ln_before",
                                            "original_ln_after",
                                            "residual_before_ln",
                                            "adapter_residual_before_ln",
                                            "mh_adapter",
                                            "output_adapter",
                                            "leave_out",
                                            "phm_layer",
                                            "phm_dim",
                                            "phm_rank",
                                            "shared_phm_rule",
                                            "factorized_phm_rule",
                                            "shared_W_phm",
                                            "factorized_phm_W",
                                            "phm_bias"};
  adapterhub::check_part(part, source, handled);
  const Source where{source, 0, 0};
  auto p = Params::map("", where);
  auto set = [&](const std::string& key, const std::string& value, const std::string& origin) {
    p.set(key, Params::scalar(value, origin, where));
  };
  auto flag = [&](const std::string& key) { return part.value(key, false) == true; };
  const auto& rf = part.value("reduction_factor", nlohmann::json(16));
  if (!rf.is_number())
    throw FileError(source, "reduction_factor " + rf.dump() +
                                " (one per layer) is not implemented; graft reads one number");
  set("reduction_factor", rf.dump(), "reduction_factor");
  const auto& f = part.value("non_linearity", nlohmann::json("relu"));
  if (!f.is_string()) throw FileError(source, "non_linearity " + f.dump() + " is not a name");
  auto fname = f.get<std::string>();
  for (auto& ch : fname) ch = static_cast<char>(std::tolower(static_cast<unsigned char>(ch)));
  if (std::find(kNonLinearities.begin(), kNonLinearities.end(), fname) == kNonLinearities.end())
    throw FileError(source, "non_linearity \"" + fname +
                                "\" is not implemented (graft has relu, "
                                "gelu, gelu_new, swish/silu, tanh, leakyrelu, sigmoid)");
  set("non_linearity", fname, "non_linearity");
  const auto& s = part.value("scaling", nlohmann::json(1.0));
  if (s.is_number()) {
    set("scaling", s.dump(), "scaling");
  } else if (s == "learned" || s == "channel") {
    set("scaling", s.get<std::string>(), "scaling");
  } else {
    throw FileError(source, "scaling " + s.dump() + " is not a number, \"learned\" or \"channel\"");
  }
  for (const auto& [key, hub] : std::vector<std::pair<std::string, std::string>>{
           {"ln_before", "ln_before"},
           {"ln_after", "ln_after"},
           {"gating", "use_gating"},
           {"parallel", "is_parallel"},
           {"original_ln_before", "original_ln_before"},
           {"original_ln_after", "original_ln_after"},
           {"adapter_residual_before_ln", "adapter_residual_before_ln"}})
    set(key, flag(hub) ? "true" : "false", hub);
  const auto& r = part.value("residual_before_ln", nlohmann::json(true));
  set("residual_before_ln",
      r.is_boolean() ? (r.get<bool>() ? "true" : "false") : r.get<std::string>(),
      "residual_before_ln");
  auto targets = Params::list("targets", where);
  if (flag("mh_adapter")) targets.add(Params::scalar("attn.out", "mh_adapter", where));
  if (flag("output_adapter")) targets.add(Params::scalar("ffn.out", "output_adapter", where));
  if (!flag("mh_adapter") && !flag("output_adapter"))
    throw FileError(source,
                    "neither mh_adapter nor output_adapter is set: the adapter sits nowhere");
  p.set("targets", targets);
  const auto& leave = part.value("leave_out", nlohmann::json::array());
  if (!leave.is_array()) throw FileError(source, "leave_out " + leave.dump() + " is not a list");
  if (!leave.empty()) {
    auto list = Params::list("leave_out", where);
    for (const auto& l : leave) list.add(Params::scalar(l.dump(), "leave_out", where));
    p.set("leave_out", list);
  }
  if (part.value("cross_adapter", false) == true)
    throw FileError(source, "cross_adapter (encoder-decoder cross-attention) is not implemented");
  return p;
}

nlohmann::json bottleneck_part(const AdapterConfig& c, const Model& model,
                               const std::string& method) {
  bool attn = false, ffn = false;
  std::vector<std::int64_t> layers;
  for (const auto& site : select_sites(model, c.selection, method)) {
    attn = attn || site.point == "attn.out";
    ffn = ffn || site.point == "ffn.out";
    if (std::find(layers.begin(), layers.end(), site.layer) == layers.end())
      layers.push_back(site.layer);
  }
  // AdapterHub places an adapter at every layer but leave_out, at both points it names.
  std::vector<std::int64_t> leave_out;
  for (std::int64_t l = 0; l < model.config().num_layers; ++l)
    if (std::find(layers.begin(), layers.end(), l) == layers.end()) leave_out.push_back(l);
  nlohmann::json scaling = c.scaling;
  if (c.scaling_mode != "fixed") scaling = c.scaling_mode;
  // No "architecture" key: AdapterHub's bottleneck configurations are the ones without it.
  return {{"mh_adapter", attn},
          {"output_adapter", ffn},
          {"reduction_factor", c.reduction_factor},
          {"non_linearity", c.non_linearity == "silu" ? "swish" : c.non_linearity},
          {"original_ln_before", c.original_ln_before},
          {"original_ln_after", c.original_ln_after},
          {"residual_before_ln", c.residual_before_ln == "post_add"
                                     ? nlohmann::json("post_add")
                                     : nlohmann::json(c.residual_before_ln == "true")},
          {"adapter_residual_before_ln", c.adapter_residual_before_ln},
          {"ln_before", c.ln_before},
          {"ln_after", c.ln_after},
          {"init_weights", c.init == "mam" ? "mam_adapter" : c.init},
          {"is_parallel", c.parallel},
          {"scaling", scaling},
          {"use_gating", c.gating},
          {"dropout", c.dropout},
          {"leave_out", leave_out},
          {"phm_layer", false},
          {"cross_adapter", false},
          {"inv_adapter", nullptr},
          {"inv_adapter_reduction_factor", nullptr},
          {"stochastic_depth", 0.0}};
}

void Bottleneck::attach(Model& model) {
  for (const auto& site : select_sites(model, c_.selection, name())) {
    if (!is_sublayer_point(site.point))
      throw Error(name() + ": site '" + site.name + "' (point " + site.point +
                  ") is not a sublayer output; adapters sit at attn.out or ffn.out");
    add_hook(model, site.name,
             std::make_shared<Adapter>(c_, site.out_features, c_.width(site, name())));
  }
}

bool reads_bottleneck_part(const nlohmann::json& part) {
  const auto& a = part.value("architecture", nlohmann::json());
  return (a.is_null() || a == "bottleneck") && part.value("phm_layer", false) != true;
}

std::vector<std::unique_ptr<Method>> read_bottleneck_part(const nlohmann::json& part,
                                                          const std::string& name,
                                                          io::TensorMap& tensors, Model& model,
                                                          const std::string& source) {
  const auto settings = bottleneck_settings(part, source);
  auto c = AdapterConfig::from_params(settings, AdapterConfig(), {"ffn.out"});
  return adapterhub::attach_part(
      std::make_unique<Bottleneck>("bottleneck", c), model, source, [&](Method& m) {
        return from_hub(tensors, name, m.state(), model, hub_names(c, true), source);
      });
}

std::pair<nlohmann::json, io::TensorMap> write_bottleneck_part(Method& method, const Model& model,
                                                               const std::string& name) {
  auto* b = dynamic_cast<Bottleneck*>(&method);
  if (!b) throw Error(method.name() + ": not a bottleneck adapter");
  const auto& c = b->settings();
  return {bottleneck_part(c, model, method.name()),
          to_hub(method.state(), name, model, hub_names(c, true))};
}

}  // namespace graft::plugins::adapters
