// AdapterHub's LoRA architecture (LoRAConfig: composition_mode "add" is LoRA, "scale" is IA3),
// shared by the lora and ia3 plugins: which sites a configuration part adapts and where each
// site's tensors sit in the file. AdapterHub's locations: selfattn_lora adapts the attention
// matrices attn_matrices (q, k, v); intermediate_lora the "intermediate" projection (BERT
// intermediate.dense, GPT-2 mlp.c_fc, LLaMA mlp.down_proj); output_lora the "output" one (BERT
// output.dense, GPT-2 mlp.c_proj, LLaMA mlp.up_proj); every layer but leave_out. GPT-2's fused
// c_attn holds one lora_A [n r, in] and lora_B [n d, r] for its n adapted matrices, in q, k, v
// order: matrix j uses rows j r.. of A and j d.. of B.
#pragma once

#include <graft/adapterhub.h>
#include <graft/error.h>
#include <graft/peft.h>

#include <algorithm>
#include <nlohmann/json.hpp>
#include <set>
#include <string>
#include <vector>

namespace graft::plugins::hub_lora {

struct Location {
  Site site;
  std::string module;      ///< transformers module path ("model.layers.3.self_attn.q_proj")
  std::int64_t index = 0;  ///< which of the module's adapted matrices (fused c_attn)
  std::int64_t count = 1;  ///< how many it has
  std::int64_t rows = 0;   ///< the site's output rows
};

inline std::string intermediate_point(const ModelConfig& c) {
  return c.family == "llama" ? "ffn.down" : "ffn.up";
}
inline std::string output_point(const ModelConfig& c) {
  return c.family == "llama" ? "ffn.up" : "ffn.down";
}

/// The sites a LoRA-architecture part adapts, in model order. Errors name `source`.
inline std::vector<Location> locations(const nlohmann::json& part, const Model& model,
                                       const std::string& source) {
  const auto& c = model.config();
  std::set<std::string> matrices;
  for (const auto& m : part.value("attn_matrices", nlohmann::json::array())) {
    if (m != "q" && m != "k" && m != "v")
      throw FileError(source, "attn_matrices entry " + m.dump() + " is not q, k or v");
    matrices.insert(m.get<std::string>());
  }
  std::set<std::int64_t> leave;
  for (const auto& l : part.value("leave_out", nlohmann::json::array())) {
    if (!l.is_number_integer()) throw FileError(source, "leave_out entry " + l.dump());
    leave.insert(l.get<std::int64_t>());
  }
  std::set<std::string> points;
  if (part.value("selfattn_lora", true) == true)
    for (const auto& m : matrices) points.insert("attn." + m);
  if (part.value("intermediate_lora", false) == true) points.insert(intermediate_point(c));
  if (part.value("output_lora", false) == true) points.insert(output_point(c));
  if (points.empty()) throw FileError(source, "the LoRA configuration adapts no module");
  std::vector<Location> out;
  for (const auto& site : model.sites()) {
    if (site.layer < 0 || leave.count(site.layer) || !points.count(site.point)) continue;
    const auto m = peft::module_of(c, site);
    Location loc{site, m.path, 0, 1, site.out_features};
    if (m.rows > 0) {  // a fused module: count the adapted matrices before this one
      loc.count = 0;
      for (const std::string q : {"q", "k", "v"}) {
        if (!points.count("attn." + q)) continue;
        if ("attn." + q == site.point) loc.index = loc.count;
        ++loc.count;
      }
    }
    out.push_back(loc);
  }
  return out;
}

/// The rows of `full` (a fused module's tensor) that belong to `loc`, `per` rows each.
inline at::Tensor rows_of(const at::Tensor& full, const Location& loc, std::int64_t per) {
  return full.narrow(0, loc.index * per, per).contiguous();
}

/// The keys of an adapter's LoRA tensors at a module: "<module>.loras.<name>.<tensor>".
inline std::string key(const Location& loc, const std::string& name, const std::string& tensor) {
  return loc.module + ".loras." + name + "." + tensor;
}

/// Takes the tensor `tensor` of `loc` out of `tensors`; a fused module's tensor is taken once and
/// kept in `fused` for its other matrices.
inline at::Tensor take(io::TensorMap& tensors, io::TensorMap& fused, const Location& loc,
                       const std::string& name, const std::string& tensor,
                       const std::string& source) {
  const auto k = key(loc, name, tensor);
  if (loc.count == 1 && !fused.count(k)) return adapterhub::take(tensors, k, source);
  if (!fused.count(k)) fused[k] = adapterhub::take(tensors, k, source);
  return fused.at(k);
}

/// A part's settings common to both composition modes, checked, and the names of its sites.
inline std::vector<std::string> site_names(const std::vector<Location>& locs) {
  std::vector<std::string> out;
  for (const auto& l : locs) out.push_back(l.site.name);
  return out;
}

/// The LoRA-architecture part that adapts exactly `sites` (site names), or an error saying
/// AdapterHub cannot express them (`method` names the method).
inline nlohmann::json part_for(const std::set<std::string>& sites, const Model& model,
                               const std::string& method) {
  const auto& c = model.config();
  std::set<std::string> points;
  std::set<std::int64_t> layers;
  for (const auto& s : model.sites())
    if (sites.count(s.name)) {
      points.insert(s.point);
      layers.insert(s.layer);
    }
  nlohmann::json matrices = nlohmann::json::array();
  for (const std::string q : {"q", "k", "v"})
    if (points.count("attn." + q)) matrices.push_back(q);
  nlohmann::json leave = nlohmann::json::array();
  for (std::int64_t l = 0; l < c.num_layers; ++l)
    if (!layers.count(l)) leave.push_back(l);
  nlohmann::json part = {{"architecture", "lora"},
                         {"selfattn_lora", !matrices.empty()},
                         {"attn_matrices", matrices},
                         {"intermediate_lora", points.count(intermediate_point(c)) > 0},
                         {"output_lora", points.count(output_point(c)) > 0},
                         {"leave_out", leave}};
  std::set<std::string> expressed;
  for (const auto& l : locations(part, model, method)) expressed.insert(l.site.name);
  if (expressed != sites)
    throw Error(method +
                ": its sites have no AdapterHub LoRA configuration (AdapterHub adapts "
                "attention q/k/v, the intermediate and output projections, in every "
                "layer but leave_out)");
  return part;
}

}  // namespace graft::plugins::hub_lora
