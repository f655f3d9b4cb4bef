// Sequential bottleneck adapters (Houlsby et al. 2019; Pfeiffer et al. 2020), with the two presets
// recipes name directly: `pfeiffer` (after the feed-forward, reduction 16, relu) and `houlsby`
// (after attention and after the feed-forward, reduction 16, silu).
#include <graft/plugin.h>

#include "adapter.h"

namespace graft::plugins::adapters {
namespace {

class Bottleneck : public HookMethod {
 public:
  Bottleneck(std::string name, AdapterConfig c) : name_(std::move(name)), c_(std::move(c)) {}
  std::string name() const override { return name_; }
  nlohmann::json config() const override { return c_.to_json(); }

  void attach(Model& model) override {
    for (const auto& site : select_sites(model, c_.selection, name())) {
      if (!is_sublayer_point(site.point))
        throw Error(name() + ": site '" + site.name + "' (point " + site.point +
                    ") is not a sublayer output; adapters sit at attn.out or ffn.out");
      auto hook = std::make_shared<Adapter>(c_, site.out_features, c_.width(site, name()));
      add_hook(model, site.name, hook);
    }
  }

 private:
  std::string name_;
  AdapterConfig c_;
};

void add(Registry& registry, const std::string& name, const std::string& description,
         AdapterConfig preset, std::vector<std::string> targets) {
  MethodInfo info;
  info.name = name;
  info.version = "1.0.0";
  info.description = description;
  info.points = {"attn.out", "ffn.out"};
  registry.add(info, [=](const Params& p) -> std::unique_ptr<Method> {
    return std::make_unique<Bottleneck>(name, AdapterConfig::from_params(p, preset, targets));
  });
}

void register_bottleneck(Registry& registry) {
  AdapterConfig pfeiffer;  // AdapterHub's SeqBnConfig
  pfeiffer.reduction_factor = 16;
  pfeiffer.non_linearity = "relu";
  AdapterConfig houlsby = pfeiffer;  // AdapterHub's DoubleSeqBnConfig
  houlsby.non_linearity = "silu";
  add(registry, "bottleneck", "sequential bottleneck adapters after attention and/or feed-forward",
      pfeiffer, {"ffn.out"});
  add(registry, "pfeiffer", "bottleneck preset: after the feed-forward, reduction 16, relu",
      pfeiffer, {"ffn.out"});
  add(registry, "houlsby",
      "bottleneck preset: after attention and feed-forward, reduction 16, silu", houlsby,
      {"attn.out", "ffn.out"});
}

}  // namespace
}  // namespace graft::plugins::adapters

GRAFT_PLUGIN("bottleneck", "1.0.0", graft::plugins::adapters::register_bottleneck)
