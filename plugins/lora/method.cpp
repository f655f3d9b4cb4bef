// LoRA (Hu et al. 2021), with rsLoRA scaling (Kalajdzievski 2023) and DoRA (Liu et al. 2024).
#include <graft/adapterhub.h>
#include <graft/plugin.h>

#include <cmath>

#include "config.h"
#include "layer.h"
#include "lora.h"

namespace graft::plugins::lora {

LoraConfig LoraConfig::from_params(const Params& p) {
  check_method_keys(p, {"r", "alpha", "rslora", "dropout", "init", "dora", "gating", "rank_pattern",
                        "alpha_pattern", "scale"});
  LoraConfig c;
  c.r = p.get_positive_int("r", c.r);
  c.alpha = p.get_double("alpha", c.alpha);  // peft's default is 8 whatever r is
  if (p.has("alpha") && c.alpha <= 0)
    p.at("alpha").fail("expected a positive number, got \"" + p.at("alpha").text() + "\"");
  c.rslora = p.get_bool("rslora", c.rslora);
  c.dropout = p.has("dropout") ? p.at("dropout").as_probability() : 0.0;
  c.init = p.get_choice("init", {"default", "gaussian"}, c.init);
  c.dora = p.get_bool("dora", c.dora);
  if (c.dora && c.dropout > 0)
    p.at("dropout").fail("dropout is not supported together with dora in this version; use 0");
  c.gating = p.get_bool("gating", c.gating);
  c.scale = p.get_double("scale", c.scale);
  if (c.dora && c.gating) p.at("gating").fail("gating does not combine with dora; use one");
  c.selection = Selection::from_params(p, {"attn.q", "attn.v"});
  c.rank_pattern = SitePatterns<std::int64_t>::read(p, "rank_pattern", positive_int);
  c.alpha_pattern = SitePatterns<double>::read(p, "alpha_pattern", positive_number);
  return c;
}

nlohmann::json LoraConfig::to_json() const {
  nlohmann::json j = {{"r", r},       {"alpha", alpha}, {"rslora", rslora}, {"dropout", dropout},
                      {"init", init}, {"dora", dora},   {"gating", gating}};
  if (scale != 1.0) j["scale"] = scale;
  j.update(selection.to_json());
  rank_pattern.write(j, "rank_pattern");
  alpha_pattern.write(j, "alpha_pattern");
  return j;
}

std::pair<std::int64_t, double> LoraConfig::rank_alpha(const Site& site) const {
  return {rank_pattern.at(site, r), alpha_pattern.at(site, alpha)};
}

void Lora::attach(Model& model) {
  for (const auto& site : select_sites(model, c_.selection, name())) {
    if (!Model::is_linear_point(site.point))
      throw Error("lora: site '" + site.name + "' (point " + site.point +
                  ") is not a linear projection; LoRA applies to attn.q/k/v/o, ffn.gate/up/down "
                  "and head");
    auto* lin = model.linear(site.name);
    const auto [rank, alpha] = c_.rank_alpha(site);
    const bool gaussian = c_.init == "gaussian";
    unscaled_[site.name] = scaling(rank, alpha);
    const double s = unscaled_[site.name] * c_.scale;
    std::shared_ptr<Hook> hook;
    if (c_.dora) {
      hook = std::make_shared<DoraTransform>(*lin, rank, s, gaussian);
    } else {
      hook = std::make_shared<LoraDelta>(lin->in_features, lin->out_features, rank, s, c_.dropout,
                                         gaussian, c_.gating);
    }
    hook->to(lin->weight.device());
    add_hook(model, site.name, hook);
  }
}

void Lora::set_scale(double scale) {
  if (merged()) throw Error("lora: unmerge it before changing its scale");
  if (!std::isfinite(scale)) throw Error("lora: the scale must be a finite number");
  c_.scale = scale;
  for (const auto& [site, hook] : hook_list()) {
    const double s = unscaled_.at(site) * scale;
    if (auto d = std::dynamic_pointer_cast<LoraDelta>(hook)) d->scaling = s;
    if (auto t = std::dynamic_pointer_cast<DoraTransform>(hook)) t->scaling = s;
  }
}

namespace {

void register_lora(Registry& registry) {
  MethodInfo info;
  info.name = "lora";
  info.version = "1.0.0";
  info.description = "low-rank updates B A on linear projections (rsLoRA, DoRA, rank patterns)";
  info.mergeable = true;
  info.points = Model::linear_points();
  info.combinations = {"linear",          "cat",         "svd",      "ties",
                       "magnitude_prune", "dare_linear", "dare_ties"};
  info.combine = combine;
  registry.add(info, [](const Params& p) -> std::unique_ptr<Method> {
    return std::make_unique<Lora>(LoraConfig::from_params(p));
  });
  registry.add_format({"peft", "lora", detect_peft, read_peft, write_peft, {}, {}, {}});
  registry.add_format(
      {"gguf", "lora", detect_gguf_lora, read_gguf_lora, write_gguf_lora, {}, {}, {}});
  registry.add_format(
      adapterhub::part_format("lora", reads_hub_part, read_hub_part, write_hub_part));
}

}  // namespace
}  // namespace graft::plugins::lora

GRAFT_PLUGIN("lora", "1.0.0", graft::plugins::lora::register_lora)
