// AdapterHub's LoRA configurations (architecture "lora", composition_mode "add"): tensors
// "<module>.loras.<name>.lora_A" [r, in] and "lora_B" [out, r] without ".weight", scaling
// alpha / r, or with use_gating (UniPELT) a gate and no scaling (layer.cpp); sites as
// common/hub_lora.h places them.
#include <graft/adapterhub.h>

#include "../common/hub_lora.h"
#include "../common/peft_shared.h"
#include "layer.h"
#include "lora.h"

namespace graft::plugins::lora {

bool reads_hub_part(const nlohmann::json& part) {
  return part.value("architecture", nlohmann::json()) == "lora" &&
         part.value("composition_mode", nlohmann::json("add")) == "add";
}

std::vector<std::unique_ptr<Method>> read_hub_part(const nlohmann::json& part,
                                                   const std::string& name, io::TensorMap& tensors,
                                                   Model& model, const std::string& source) {
  adapterhub::check_part(part, source,
                         {"r", "alpha", "attn_matrices", "selfattn_lora", "intermediate_lora",
                          "output_lora", "composition_mode", "use_gating", "leave_out"});
  const auto locs = hub_lora::locations(part, model, source);
  const auto& r = part.value("r", nlohmann::json());
  const auto& alpha = part.value("alpha", nlohmann::json());
  if (!r.is_number_integer() || !alpha.is_number())
    throw FileError(source, "a LoRA configuration needs an integer r and a number alpha");
  const bool gating = part.value("use_gating", false) == true;
  for (const auto& l : locs)
    if (gating && l.count > 1)
      throw FileError(source, "a gated LoRA on " + l.module + " (one gate for " +
                                  std::to_string(l.count) + " fused matrices) is not implemented");
  peft_shared::Settings s(source);
  s.set("r", r.get<std::int64_t>(), "r");
  s.set("alpha", alpha.get<double>(), "alpha");
  s.set("gating", gating, "use_gating");
  s.set_list("targets", hub_lora::site_names(locs), "attn_matrices");
  auto method = std::make_unique<Lora>(LoraConfig::from_params(s.params()));
  io::TensorMap state, fused;
  const auto rank = r.get<std::int64_t>();
  for (const auto& l : locs) {
    const auto A = hub_lora::take(tensors, fused, l, name, "lora_A", source);
    const auto B = hub_lora::take(tensors, fused, l, name, "lora_B", source);
    if (A.dim() != 2 || B.dim() != 2 || A.size(0) != l.count * rank ||
        B.size(0) != l.count * l.rows)
      throw FileError(source, "'" + hub_lora::key(l, name, "lora_A") + "' / lora_B have shapes " +
                                  c10::str(A.sizes()) + " / " + c10::str(B.sizes()) +
                                  ", which do not fit r " + std::to_string(rank) + " on " +
                                  l.module);
    state[l.site.name + ".lora_A"] = hub_lora::rows_of(A, l, rank);
    state[l.site.name + ".lora_B"] = hub_lora::rows_of(B, l, l.rows);
    if (gating) {
      state[l.site.name + ".gate.weight"] =
          adapterhub::take(tensors, hub_lora::key(l, name, "gate.weight"), source);
      state[l.site.name + ".gate.bias"] =
          adapterhub::take(tensors, hub_lora::key(l, name, "gate.bias"), source);
    }
  }
  return adapterhub::attach_part(std::move(method), model, source, [&](Method&) { return state; });
}

std::pair<nlohmann::json, io::TensorMap> write_hub_part(Method& method, const Model& model,
                                                        const std::string& name) {
  auto* lora = dynamic_cast<Lora*>(&method);
  if (!lora) throw Error(method.name() + ": not a lora method");
  const auto& c = lora->settings();
  if (c.dora || c.rslora || c.scale != 1.0 || !c.rank_pattern.empty() || !c.alpha_pattern.empty())
    throw Error(
        "lora: DoRA, rsLoRA, a scale and rank or alpha patterns have no place in "
        "AdapterHub's LoRA configuration");
  std::set<std::string> sites;
  for (const auto& [site, hook] : lora->hooks()) sites.insert(site);
  auto part = hub_lora::part_for(sites, model, "lora");
  for (const auto& l : hub_lora::locations(part, model, "lora"))
    if (c.gating && l.count > 1)
      throw Error("lora: a gated LoRA on several matrices of " + l.module +
                  " would share one gate in AdapterHub; graft gates each site");
  part.update({{"r", c.r},
               {"alpha", c.alpha},
               {"composition_mode", "add"},
               {"use_gating", c.gating},
               {"dropout", c.dropout},
               {"init_weights", "lora"},
               {"dtype", nullptr}});
  const auto state = method.state();
  io::TensorMap out;
  std::map<std::string, std::vector<at::Tensor>> fused;  // key -> parts in index order
  for (const auto& l : hub_lora::locations(part, model, "lora")) {
    for (const std::string t : {"lora_A", "lora_B"}) {
      auto& parts = fused[hub_lora::key(l, name, t)];
      parts.resize(l.count);
      parts[l.index] = state.at(l.site.name + "." + t);
    }
    if (c.gating)
      for (const std::string t : {"gate.weight", "gate.bias"})
        out[hub_lora::key(l, name, t)] = state.at(l.site.name + "." + t);
  }
  for (auto& [key, parts] : fused) out[key] = parts.size() == 1 ? parts[0] : torch::cat(parts, 0);
  return {part, out};
}

}  // namespace graft::plugins::lora
