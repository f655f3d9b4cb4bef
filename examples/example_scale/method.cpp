// example_scale: a graft method plugin. attach() selects sites and attaches hooks; HookMethod does
// the rest (trainable parameters, saving and loading, detaching).
#include <graft/plugin.h>

#include "config.h"
#include "layer.h"

namespace example_scale {
namespace {

class Method : public graft::HookMethod {
 public:
  explicit Method(Config c) : c_(std::move(c)) {}
  std::string name() const override { return "example_scale"; }
  nlohmann::json config() const override { return c_.to_json(); }
  void attach(graft::Model& model) override {
    for (const auto& site : graft::select_sites(model, c_.selection, name())) {
      if (!graft::Model::is_linear_point(site.point))
        throw graft::Error("example_scale: site '" + site.name + "' is not a linear projection");
      add_hook(model, site.name, std::make_shared<OutputScale>(site.out_features, c_.init));
    }
  }

 private:
  Config c_;
};

void register_methods(graft::Registry& registry) {
  graft::MethodInfo info;
  info.name = "example_scale";
  info.version = "0.1.0";
  info.description = "a learned scale on linear outputs (a skeleton by graft new-plugin)";
  info.points = {"attn.q", "attn.k", "attn.v", "attn.o", "ffn.gate", "ffn.up", "ffn.down"};
  registry.add(info, [](const graft::Params& p) -> std::unique_ptr<graft::Method> {
    return std::make_unique<Method>(Config::from_params(p));
  });
}

}  // namespace
}  // namespace example_scale

GRAFT_PLUGIN("example_scale", "0.1.0", example_scale::register_methods)
