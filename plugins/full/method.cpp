// Full fine-tuning: every base parameter trainable. The baseline every comparison needs, run
// through the same path as the PEFT methods.
#include <graft/plugin.h>

namespace graft::plugins::full {
namespace {

class Full : public Method {
 public:
  explicit Full(const Params& p) { check_method_keys(p, {}); }
  std::string name() const override { return "full"; }
  nlohmann::json config() const override { return nlohmann::json::object(); }

  void attach(Model& model) override {
    model_ = &model;
    for (auto& p : model.parameters()) p.set_requires_grad(true);
  }
  void detach(Model& model) override {
    for (auto& p : model.parameters()) p.set_requires_grad(false);
    model_ = nullptr;
  }
  std::vector<std::pair<std::string, at::Tensor>> trainable_parameters() override {
    std::vector<std::pair<std::string, at::Tensor>> out;
    for (const auto& p : attached().named_parameters(true)) out.emplace_back(p.key(), p.value());
    return out;
  }
  io::TensorMap state() override {
    io::TensorMap out;
    for (const auto& p : attached().named_parameters(true)) out[p.key()] = p.value();
    return out;
  }
  void load_state(const io::TensorMap& state, const std::string& source) override {
    torch::NoGradGuard no_grad;
    for (auto& p : attached().named_parameters(true)) {
      auto it = state.find(p.key());
      if (it == state.end()) throw FileError(source, "full: missing tensor '" + p.key() + "'");
      if (it->second.sizes() != p.value().sizes())
        throw FileError(source, "full: tensor '" + p.key() + "' has shape " +
                                    c10::str(it->second.sizes()) + " but this model needs " +
                                    c10::str(p.value().sizes()));
      p.value().copy_(it->second);
    }
  }
  void set_training(bool on) override { attached().train(on); }

 private:
  Model& attached() {
    if (!model_) throw Error("full: not attached to a model");
    return *model_;
  }
  Model* model_ = nullptr;
};

void register_full(Registry& registry) {
  MethodInfo info;
  info.name = "full";
  info.version = "1.0.0";
  info.description = "full fine-tuning: every base parameter trainable (the baseline)";
  info.mergeable = false;
  registry.add(
      info, [](const Params& p) -> std::unique_ptr<Method> { return std::make_unique<Full>(p); });
}

}  // namespace
}  // namespace graft::plugins::full

GRAFT_PLUGIN("full", "1.0.0", graft::plugins::full::register_full)
