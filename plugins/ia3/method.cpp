// IA3 (Liu et al. 2022): learned vectors rescaling the keys, the values and the feed-forward
// activation. Mergeable: rows of W_k and W_v, columns of W_down.
#include <graft/adapterhub.h>
#include <graft/plugin.h>

#include <algorithm>

#include "ia3.h"

namespace graft::plugins::ia3 {

Ia3Config Ia3Config::from_params(const Params& p) {
  check_method_keys(p, {"feedforward"});
  Ia3Config c;
  c.selection = Selection::from_params(p, {"attn.k", "attn.v", "ffn.down"});
  c.feedforward = p.get_strings("feedforward", {"ffn.down"});
  return c;
}

nlohmann::json Ia3Config::to_json() const {
  nlohmann::json j = selection.to_json();
  j["feedforward"] = feedforward;
  return j;
}

void Ia3::attach(Model& model) {
  for (const auto& site : select_sites(model, c_.selection, name())) {
    if (!Model::is_linear_point(site.point))
      throw Error("ia3: site '" + site.name + "' (point " + site.point +
                  ") is not a linear projection; IA3 scales the inputs or outputs of projections");
    const bool input = std::any_of(
        c_.feedforward.begin(), c_.feedforward.end(),
        [&](const std::string& f) { return f == site.point || glob_match(f, site.name); });
    auto* lin = model.linear(site.name);
    auto hook =
        std::make_shared<Ia3Scale>(input ? site.in_features : site.out_features,
                                   input ? LinearScale::Side::input : LinearScale::Side::output);
    hook->to(lin->weight.device());
    add_hook(model, site.name, hook);
  }
}

namespace {

void register_ia3(Registry& registry) {
  MethodInfo info;
  info.name = "ia3";
  info.version = "1.0.0";
  info.description = "learned vectors scaling keys, values and the feed-forward activation";
  info.mergeable = true;
  info.points = Model::linear_points();
  info.combinations = {"linear"};  // peft's IA3 add_weighted_adapter: sum w_i l_i
  info.combine = linear_state_combiner();
  registry.add(info, [](const Params& p) -> std::unique_ptr<Method> {
    return std::make_unique<Ia3>(Ia3Config::from_params(p));
  });
  registry.add_format({"peft", "ia3", detect_peft, read_peft, write_peft, {}, {}, {}});
  registry.add_format(
      adapterhub::part_format("ia3", reads_hub_part, read_hub_part, write_hub_part));
}

}  // namespace
}  // namespace graft::plugins::ia3

GRAFT_PLUGIN("ia3", "1.0.0", graft::plugins::ia3::register_ia3)
