// Parallel adapters (He et al. 2022): h_out <- sublayer(x) + s * up(f(down(x))), reading the
// sublayer's input x. Defaults as in the MAM adapter: on the feed-forward, reduction 2, relu,
// scaling 4.0, init `mam` (up = 0, so the model is unchanged at the start).
#include <graft/plugin.h>

#include "../bottleneck/adapter.h"

namespace graft::plugins::adapters {
namespace {

class Parallel : public HookMethod {
 public:
  explicit Parallel(AdapterConfig c) : c_(std::move(c)) {}
  std::string name() const override { return "parallel"; }
  nlohmann::json config() const override { return c_.to_json(); }

  void attach(Model& model) override {
    for (const auto& site : select_sites(model, c_.selection, name())) {
      if (site.point != "attn.out" && site.point != "ffn.out")
        throw Error("parallel: site '" + site.name + "' (point " + site.point +
                    ") is not a sublayer output; parallel adapters sit at attn.out or ffn.out");
      add_hook(model, site.name,
               std::make_shared<Adapter>(c_, site.out_features, c_.width(site, name())));
    }
  }

 private:
  AdapterConfig c_;
};

void register_parallel(Registry& registry) {
  AdapterConfig mam;
  mam.reduction_factor = 2;
  mam.non_linearity = "relu";
  mam.scaling = 4.0;
  mam.init = "mam";
  mam.reads_input = true;
  MethodInfo info;
  info.name = "parallel";
  info.version = "1.0.0";
  info.description = "parallel adapters reading the sublayer input (MAM: ffn, reduction 2, s 4)";
  info.points = {"attn.out", "ffn.out"};
  registry.add(info, [=](const Params& p) -> std::unique_ptr<Method> {
    auto c = AdapterConfig::from_params(p, mam, {"ffn.out"});
    c.reads_input = true;
    return std::make_unique<Parallel>(c);
  });
}

}  // namespace
}  // namespace graft::plugins::adapters

GRAFT_PLUGIN("parallel", "1.0.0", graft::plugins::adapters::register_parallel)
