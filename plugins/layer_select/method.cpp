// layer_select: unfreezes whole base parameters chosen by layer and component: the top k layers
// (`top: k`), only attention (targets [attn.q, attn.k, attn.v, attn.o]), only norms (LayerNorm
// tuning: targets [norm.attn, norm.ffn]), or parameters named one by one (`parameters`: what peft
// keeps as modules_to_save and trained biases). Adds no parameters; the chosen ones are trained in
// place, the adapter holds their trained values, and detaching puts the base's values back.
#include <graft/plugin.h>
#include <torch/torch.h>

namespace graft::plugins::layer_select {
namespace {

class LayerSelect : public Method {
 public:
  explicit LayerSelect(const Params& p) : where_(p) {
    check_method_keys(p, {"top", "parameters"});
    top_ = p.has("top") ? p.at("top").as_positive_int() : 0;
    if (top_ && p.has("layers")) p.at("top").fail("give either top or layers, not both");
    if (p.has("parameters"))
      for (const auto& item : p.at("parameters").items()) parameters_.push_back(item.as_string());
    // Named parameters alone select nothing else; otherwise the default is every layer.
    by_sites_ = parameters_.empty() || p.has("targets") || p.has("layers") || top_;
    selection_ = Selection::from_params(p, {"layers.*"});
  }
  std::string name() const override { return "layer_select"; }
  nlohmann::json config() const override {
    nlohmann::json j = by_sites_ ? selection_.to_json() : nlohmann::json::object();
    if (top_) j["top"] = top_;
    if (!parameters_.empty()) j["parameters"] = parameters_;
    return j;
  }

  void attach(Model& model) override {
    auto all = model.named_parameters(true);
    for (const auto& name : parameters_) {
      if (!all.contains(name)) {
        std::vector<std::string> known;
        for (const auto& p : all) known.push_back(p.key());
        const auto near = did_you_mean(name, known);
        where_.at("parameters")
            .fail("this " + model.config().family + " model has no parameter '" + name + "'" +
                  (near.empty() ? " (a head tied to the embedding is not a parameter of its own)"
                                : " (did you mean \"" + near + "\"?)"));
      }
      choose(name, all[name]);
    }
    if (by_sites_) select(model);
    if (chosen_.empty())
      where_.fail(
          "layer_select: the selected sites hold no parameters (activation sites such as "
          "attn.out have none); select projections, norms, embed or head");
  }

  void select(Model& model) {
    auto sel = selection_;
    if (top_) {
      const auto L = model.config().num_layers;
      if (top_ > L)
        where_.at("top").fail("this model has " + std::to_string(L) + " layers, not " +
                              std::to_string(top_));
      for (auto l = L - top_; l < L; ++l) sel.layers.push_back(l);
    }
    auto modules = model.named_modules("", false);
    for (const auto& site : select_sites(model, sel, name())) {
      // A bias site "layers.3.attn.q.bias" is the bias of the module "layers.3.attn.q".
      const bool bias_site = site.point.rfind("bias.", 0) == 0;
      const auto module = bias_site ? site.name.substr(0, site.name.size() - 5) : site.name;
      if (!modules.contains(module)) continue;
      for (const auto& p : modules[module]->named_parameters(false)) {
        if (bias_site && p.key() != "bias") continue;
        choose(module + "." + p.key(), p.value());
      }
    }
  }

  void detach(Model&) override {
    torch::NoGradGuard no_grad;
    for (auto& [k, t] : chosen_) {
      t.set_requires_grad(false);
      if (!merged_) t.copy_(original_.at(k));
    }
    chosen_.clear();
    original_.clear();
    merged_ = false;
  }
  // The chosen values already are the base's: merging only means that detaching keeps them.
  void merge(Model&) override { merged_ = true; }
  void unmerge(Model&) override { merged_ = false; }
  bool merged() const override { return merged_; }
  std::vector<std::pair<std::string, at::Tensor>> trainable_parameters() override {
    return {chosen_.begin(), chosen_.end()};
  }
  io::TensorMap state() override { return {chosen_.begin(), chosen_.end()}; }
  void load_state(const io::TensorMap& state, const std::string& source) override {
    torch::NoGradGuard no_grad;
    for (const auto& [key, t] : state)
      if (!chosen_.count(key))
        throw FileError(source, "layer_select: unexpected tensor '" + key + "'");
    for (auto& [key, p] : chosen_) {
      auto it = state.find(key);
      if (it == state.end()) throw FileError(source, "layer_select: missing tensor '" + key + "'");
      if (it->second.sizes() != p.sizes())
        throw FileError(source, "layer_select: tensor '" + key + "' has shape " +
                                    c10::str(it->second.sizes()) + " but this model needs " +
                                    c10::str(p.sizes()));
      p.copy_(it->second);
    }
  }

 private:
  void choose(const std::string& key, const at::Tensor& value) {
    if (chosen_.count(key)) return;
    if (value.numel() == 0)
      where_.fail("layer_select: parameter '" + key +
                  "' is held by another method (a quantised base?) and cannot be trained");
    value.set_requires_grad(true);
    chosen_[key] = value;
    original_[key] = value.detach().clone();
  }

  Params where_;
  std::int64_t top_ = 0;
  std::vector<std::string> parameters_;
  bool by_sites_ = true;
  Selection selection_;
  std::map<std::string, at::Tensor> chosen_;
  std::map<std::string, at::Tensor> original_;  // the base's values, put back on detach
  bool merged_ = false;
};

void register_layer_select(Registry& registry) {
  MethodInfo info;
  info.name = "layer_select";
  info.version = "1.0.0";
  info.description = "trains chosen base parameters (top layers, attention only, norms only)";
  info.points = site_points();
  registry.add(info, [](const Params& p) -> std::unique_ptr<Method> {
    return std::make_unique<LayerSelect>(p);
  });
}

}  // namespace
}  // namespace graft::plugins::layer_select

GRAFT_PLUGIN("layer_select", "1.0.0", graft::plugins::layer_select::register_layer_select)
