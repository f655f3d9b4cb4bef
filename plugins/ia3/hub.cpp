// AdapterHub's IA3 (IA3Config: the LoRA architecture in composition_mode "scale", r 1): the
// output of each adapted projection, bias included, multiplied by lora_B [out, 1] * alpha / r,
// on the sites common/hub_lora.h places. graft's ia3 output-side vectors are exactly that.
#include <graft/adapterhub.h>

#include "../common/hub_lora.h"
#include "../common/peft_shared.h"
#include "ia3.h"

namespace graft::plugins::ia3 {

bool reads_hub_part(const nlohmann::json& part) {
  return part.value("architecture", nlohmann::json()) == "lora" &&
         part.value("composition_mode", nlohmann::json()) == "scale";
}

std::vector<std::unique_ptr<Method>> read_hub_part(const nlohmann::json& part,
                                                   const std::string& name, io::TensorMap& tensors,
                                                   Model& model, const std::string& source) {
  adapterhub::check_part(part, source,
                         {"r", "alpha", "attn_matrices", "selfattn_lora", "intermediate_lora",
                          "output_lora", "composition_mode", "leave_out"});
  if (part.value("r", nlohmann::json()) != 1 || !part.value("alpha", nlohmann::json()).is_number())
    throw FileError(source, "an IA3 (scale mode) configuration needs r 1 and a number alpha");
  const double scale = part.at("alpha").get<double>();
  const auto locs = hub_lora::locations(part, model, source);
  peft_shared::Settings s(source);
  s.set_list("targets", hub_lora::site_names(locs), "attn_matrices");
  s.set_list("feedforward", {}, "composition_mode");  // every vector scales an output
  auto method = std::make_unique<Ia3>(Ia3Config::from_params(s.params()));
  io::TensorMap state, fused;
  for (const auto& l : locs) {
    const auto B = hub_lora::take(tensors, fused, l, name, "lora_B", source);
    if (B.dim() != 2 || B.size(0) != l.count * l.rows || B.size(1) != 1)
      throw FileError(source, "'" + hub_lora::key(l, name, "lora_B") + "' has shape " +
                                  c10::str(B.sizes()) + ", which does not fit " + l.module);
    auto v = hub_lora::rows_of(B, l, l.rows).view({l.rows});
    state[l.site.name + ".ia3"] = scale == 1.0 ? v : v * scale;
  }
  return adapterhub::attach_part(std::move(method), model, source, [&](Method&) { return state; });
}

std::pair<nlohmann::json, io::TensorMap> write_hub_part(Method& method, const Model& model,
                                                        const std::string& name) {
  auto* ia3 = dynamic_cast<Ia3*>(&method);
  if (!ia3) throw Error(method.name() + ": not an ia3 method");
  std::set<std::string> sites;
  for (const auto& [site, hook] : ia3->hooks()) {
    auto scale = std::dynamic_pointer_cast<LinearScale>(hook);
    if (!scale || scale->side() != LinearScale::Side::output)
      throw Error("ia3: the vector at '" + site +
                  "' scales the projection's input (feedforward), which AdapterHub's IA3 does "
                  "not do (it scales outputs); train with feedforward: [] to export");
    sites.insert(site);
  }
  auto part = hub_lora::part_for(sites, model, "ia3");
  part.update({{"r", 1},
               {"alpha", 1},
               {"composition_mode", "scale"},
               {"use_gating", false},
               {"dropout", 0.0},
               {"init_weights", "ia3"},
               {"dtype", nullptr}});
  const auto state = method.state();
  std::map<std::string, std::vector<at::Tensor>> fused;
  for (const auto& l : hub_lora::locations(part, model, "ia3")) {
    auto& parts = fused[hub_lora::key(l, name, "lora_B")];
    parts.resize(l.count);
    parts[l.index] = state.at(l.site.name + ".ia3").view({-1, 1});
  }
  io::TensorMap out;
  for (auto& [key, parts] : fused) out[key] = parts.size() == 1 ? parts[0] : torch::cat(parts, 0);
  return {part, out};
}

}  // namespace graft::plugins::ia3
