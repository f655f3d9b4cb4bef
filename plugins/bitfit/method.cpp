// BitFit (Ben Zaken et al. 2021): trains only bias terms. A projection's bias is trained as a
// zero-initialised delta added to the output, so the base stays frozen and merging is adding it to
// the bias. Families without biases (llama) get them with `add_missing: true`. Norm sites
// (norm.attn, norm.ffn, ...) train the norm's own bias, where the norm has one.
#include <graft/plugin.h>
#include <torch/torch.h>

namespace graft::plugins::bitfit {
namespace {

class BiasDelta : public LinearDelta {
 public:
  explicit BiasDelta(std::int64_t out) { bias = register_parameter("bias", torch::zeros({out})); }
  at::Tensor delta(const at::Tensor& x, const LinearImpl&) override {
    std::vector<std::int64_t> shape(x.dim() - 1, 1);
    shape.push_back(bias.size(0));
    return bias.to(x.dtype()).view(shape);  // broadcast over the leading dimensions
  }
  at::Tensor delta_bias(const LinearImpl&) override { return bias; }
  at::Tensor bias;
};

struct Config {
  bool add_missing = false;
  Selection selection;
};

class BitFit : public HookMethod {
 public:
  explicit BitFit(const Params& p) {
    check_method_keys(p, {"add_missing"});
    c_.add_missing = p.get_bool("add_missing", false);
    c_.selection = Selection::from_params(p, {"all-linear"});
  }
  std::string name() const override { return "bitfit"; }
  nlohmann::json config() const override {
    nlohmann::json j = {{"add_missing", c_.add_missing}};
    j.update(c_.selection.to_json());
    return j;
  }

  void attach(Model& model) override {
    auto modules = model.named_modules("", false);
    std::vector<std::string> skipped;
    for (const auto& site : select_sites(model, c_.selection, name())) {
      if (site.point.rfind("norm.", 0) == 0) {
        if (!modules.contains(site.name)) continue;
        auto params = modules[site.name]->named_parameters(false);
        if (!params.contains("bias")) {
          skipped.push_back(site.name);
          continue;
        }
        auto bias = params["bias"];
        bias.set_requires_grad(true);
        norms_.emplace_back(site.name + ".bias", bias);
        continue;
      }
      if (!Model::is_linear_point(site.point))
        throw Error("bitfit: site '" + site.name + "' (point " + site.point +
                    ") has no bias; bitfit trains the biases of linear projections and norms");
      auto* lin = model.linear(site.name);
      if (!lin->bias.defined() && !c_.add_missing) {
        skipped.push_back(site.name);
        continue;
      }
      auto hook = std::make_shared<BiasDelta>(lin->out_features);
      hook->to(lin->weight.device());
      add_hook(model, site.name, hook);
    }
    if (hook_list().empty() && norms_.empty())
      c_.selection.where.fail(
          "bitfit: none of the selected sites has a bias (e.g. " +
          (skipped.empty() ? std::string("none selected") : skipped.front()) +
          "); set add_missing: true to add zero-initialised biases to the selected projections");
  }

  void detach(Model& model) override {
    HookMethod::detach(model);
    for (auto& [name, t] : norms_) t.set_requires_grad(false);
    norms_.clear();
  }
  std::vector<std::pair<std::string, at::Tensor>> trainable_parameters() override {
    auto out = HookMethod::trainable_parameters();
    out.insert(out.end(), norms_.begin(), norms_.end());
    return out;
  }
  io::TensorMap state() override {
    auto out = HookMethod::state();
    for (const auto& [name, t] : norms_) out[name] = t;
    return out;
  }
  void load_state(const io::TensorMap& state, const std::string& source) override {
    io::TensorMap own = state;
    torch::NoGradGuard no_grad;
    for (auto& [name, t] : norms_) {
      auto it = own.find(name);
      if (it == own.end()) throw FileError(source, "bitfit: missing tensor '" + name + "'");
      t.copy_(it->second);
      own.erase(it);
    }
    HookMethod::load_state(own, source);
  }

 private:
  Config c_;
  std::vector<std::pair<std::string, at::Tensor>> norms_;  // norm biases trained in place
};

void register_bitfit(Registry& registry) {
  MethodInfo info;
  info.name = "bitfit";
  info.version = "1.0.0";
  info.description = "trains only bias terms (add_missing: zero biases where a model has none)";
  info.mergeable = true;
  info.points = Model::linear_points();
  for (const char* norm : {"norm.attn", "norm.ffn", "norm.embed", "norm.final"})
    info.points.emplace_back(norm);
  registry.add(
      info, [](const Params& p) -> std::unique_ptr<Method> { return std::make_unique<BitFit>(p); });
}

}  // namespace
}  // namespace graft::plugins::bitfit

GRAFT_PLUGIN("bitfit", "1.0.0", graft::plugins::bitfit::register_bitfit)
