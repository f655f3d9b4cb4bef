// layer_select: unfreezes whole base parameters chosen by layer and component: the top k layers
// (`top: k`), only attention (targets [attn.q, attn.k, attn.v, attn.o]), only norms (LayerNorm
// tuning: targets [norm.attn, norm.ffn]). Adds no parameters; the chosen ones are trained in place,
// so there is nothing to merge and the adapter holds their trained values.
#include <graft/plugin.h>
#include <torch/torch.h>

namespace graft::plugins::layer_select {
namespace {

class LayerSelect : public Method {
 public:
  explicit LayerSelect(const Params& p) : where_(p) {
    check_method_keys(p, {"top"});
    top_ = p.has("top") ? p.at("top").as_positive_int() : 0;
    if (top_ && p.has("layers")) p.at("top").fail("give either top or layers, not both");
    selection_ = Selection::from_params(p, {"layers.*"});
  }
  std::string name() const override { return "layer_select"; }
  nlohmann::json config() const override {
    auto j = selection_.to_json();
    if (top_) j["top"] = top_;
    return j;
  }

  void attach(Model& model) override {
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
        const auto key = module + "." + p.key();
        if (chosen_.count(key)) continue;
        p.value().set_requires_grad(true);
        chosen_[key] = p.value();
      }
    }
    if (chosen_.empty())
      where_.fail(
          "layer_select: the selected sites hold no parameters (activation sites such as "
          "attn.out have none); select projections, norms, embed or head");
  }
  void detach(Model&) override {
    for (auto& [k, t] : chosen_) t.set_requires_grad(false);
    chosen_.clear();
  }
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
  Params where_;
  std::int64_t top_ = 0;
  Selection selection_;
  std::map<std::string, at::Tensor> chosen_;
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
