// LoRA adapters in Hugging Face peft's format: adapter_config.json (peft_type "LORA", r,
// lora_alpha, use_rslora, use_dora, rank_pattern, alpha_pattern, target_modules) and
// adapter_model.safetensors with tensors named
//   base_model.model.<module>.lora_A.weight  [r, in]
//   base_model.model.<module>.lora_B.weight  [out, r]
//   base_model.model.<module>.lora_magnitude_vector  [out]   (DoRA)
// where <module> is the transformers module path of the site (model.layers.3.self_attn.q_proj,
// transformer.h.3.attn.c_attn, bert.encoder.layer.3.attention.self.query, ...).
//
// GPT-2 keeps q, k and v in one module (c_attn, output [q; k; v]). Reading, its A is shared by the
// three sites and its B split by rows. Writing, LoRA on some of q, k, v becomes one LoRA on c_attn
// of rank r_q + r_k + r_v: A = [A_q; A_k; A_v] and B block-diagonal with each block already
// scaled, so the fused module's own scaling is 1. Both are exact.
#include <graft/peft.h>
#include <graft/plugin.h>
#include <torch/torch.h>

#include <map>
#include <set>
#include <sstream>

#include "../common/peft_shared.h"
#include "layer.h"
#include "lora.h"

namespace graft::plugins::lora {
namespace fs = std::filesystem;
using nlohmann::json;

using peft::kPrefix;

bool detect_peft(const fs::path& dir) { return peft::is_adapter(dir, "LORA"); }

std::vector<std::unique_ptr<Method>> read_peft(const fs::path& dir, Model& model) {
  const auto cfg_path = (dir / "adapter_config.json").string();
  const auto tensors_path = peft::tensors_path(dir);
  const json cfg = peft::read_config(dir);
  peft::check_config(
      cfg, cfg_path,
      {"r", "lora_alpha", "use_rslora", "use_dora", "rank_pattern", "alpha_pattern"});
  auto tensors = peft::read_tensors(dir);
  const auto& c = model.config();

  const auto by_module = peft::index_modules(model);

  const bool rslora = cfg.value("use_rslora", false);
  const bool dora = cfg.value("use_dora", false);
  const double base_alpha = cfg.value("lora_alpha", 8.0);
  const auto base_r = cfg.value("r", 8);
  peft_shared::Settings settings(cfg_path);
  settings.set("r", std::int64_t{base_r}, "r");
  settings.set("alpha", base_alpha, "lora_alpha");
  settings.set("rslora", rslora, "use_rslora");
  settings.set("dora", dora, "use_dora");
  std::vector<std::string> targets;
  auto ranks = settings.map("rank_pattern"), alphas = settings.map("alpha_pattern");
  io::TensorMap state;
  std::vector<std::string> taken;
  const std::string suffix_a = ".lora_A.weight";
  std::set<std::string> modules;
  for (const auto& [key, a] : tensors) {
    const auto module = peft::module_of_tensor(key, suffix_a);
    if (module.empty()) continue;
    taken.push_back(key);
    modules.insert(module);
    auto it = by_module.find(module);
    if (it == by_module.end())
      throw FileError(tensors_path, "LoRA on module '" + module + "', which this " + c.family +
                                        " model does not have (an adapter for another model?)");
    const std::string prefix = key.substr(0, key.size() - suffix_a.size());
    auto b_it = tensors.find(prefix + ".lora_B.weight");
    if (b_it == tensors.end())
      throw FileError(tensors_path, "missing '" + prefix + ".lora_B.weight'");
    const auto& b = b_it->second;
    taken.push_back(b_it->first);
    at::Tensor magnitude;
    for (const auto& name :
         {prefix + ".lora_magnitude_vector", prefix + ".lora_magnitude_vector.weight"})
      if (tensors.count(name)) {
        magnitude = tensors.at(name);
        taken.push_back(name);
      }
    if (dora && !magnitude.defined())
      throw FileError(tensors_path,
                      "use_dora is set but '" + prefix + "' has no lora_magnitude_vector");
    const auto r = a.size(0);
    double alpha = base_alpha;
    if (auto* v = peft::pattern_value(cfg, "alpha_pattern", module)) alpha = v->get<double>();
    for (const auto& [site, where] : it->second) {
      const auto rows = where.rows ? where.rows : b.size(0);
      if (b.dim() != 2 || b.size(1) != r || where.row0 + rows > b.size(0) ||
          a.size(1) != site.in_features)
        throw FileError(tensors_path, "'" + prefix + "': lora_A " + c10::str(a.sizes()) +
                                          " and lora_B " + c10::str(b.sizes()) +
                                          " do not fit site " + site.name + " (" +
                                          std::to_string(site.in_features) + " -> " +
                                          std::to_string(site.out_features) + ")");
      targets.push_back(site.name);
      ranks.set(site.name, settings.scalar(std::to_string(r), "rank_pattern"));
      alphas.set(site.name, settings.scalar(alpha, "alpha_pattern"));
      // peft's rows are in transformers' q/k order, which graft runs loaded models in too.
      auto rows_of = [&](const at::Tensor& t) {
        auto part = t.narrow(0, where.row0, rows);
        if (site.point == "attn.q" || site.point == "attn.k")
          part = permute_rope_rows(part, site.point == "attn.q" ? c.num_heads : c.num_kv_heads,
                                   RopeStyle::half_split, c.rope_style);
        return part.contiguous();
      };
      state[site.name + ".lora_A"] = a;
      state[site.name + ".lora_B"] = rows_of(b);
      if (dora) state[site.name + ".lora_magnitude"] = rows_of(magnitude);
    }
  }
  if (targets.empty()) throw FileError(tensors_path, "holds no lora_A tensors");
  peft::check_targets(cfg, model, modules, suffix_a, tensors_path);
  settings.set_list("targets", targets, "target_modules");
  settings.set("rank_pattern", ranks);
  settings.set("alpha_pattern", alphas);
  auto method = std::make_unique<Lora>(LoraConfig::from_params(settings.params()));
  method->attach(model);
  method->load_state(state, tensors_path);
  for (const auto& key : taken) tensors.erase(key);
  std::vector<std::unique_ptr<Method>> methods;
  methods.push_back(std::move(method));
  peft_shared::read(tensors, model, tensors_path, methods);
  return methods;
}

void write_peft(const std::vector<Method*>& methods, const Model& model, const fs::path& dir) {
  auto* lora = dynamic_cast<Lora*>(methods.at(0));
  if (!lora) throw Error("peft format: not a LoRA method");
  const auto& s = lora->settings();
  if (s.gating) throw Error("peft format: LoRA with gating (UniPELT) has no peft equivalent");
  const auto& c = model.config();
  io::TensorMap out;
  json rank_pattern = json::object(), alpha_pattern = json::object();
  std::set<std::string> wrapped_modules;
  std::vector<std::string> wrapped;  // the module paths the LoRA adapts
  // GPT-2's fused q/k/v, gathered per c_attn module: (row offset, A, scaled B).
  std::map<std::string, std::vector<std::tuple<std::int64_t, at::Tensor, at::Tensor>>> fused;
  for (const auto& [site_name, hook] : lora->hooks()) {
    const Site* site = model.find_site(site_name);
    const auto where = peft::module_of(c, *site);
    const std::string prefix = kPrefix + where.path;
    at::Tensor a, b, magnitude;
    double scaling = 0;
    if (auto d = std::dynamic_pointer_cast<LoraDelta>(hook)) {
      a = d->A.detach(), b = d->B.detach(), scaling = d->scaling;
    } else if (auto t = std::dynamic_pointer_cast<DoraTransform>(hook)) {
      a = t->A.detach(), b = t->B.detach(), scaling = t->scaling, magnitude = t->magnitude.detach();
    }
    wrapped_modules.insert(where.path);
    wrapped.push_back(where.path);
    // peft keeps q and k rows in transformers' order.
    if (site->point == "attn.q" || site->point == "attn.k") {
      const auto heads = site->point == "attn.q" ? c.num_heads : c.num_kv_heads;
      b = permute_rope_rows(b, heads, c.rope_style, RopeStyle::half_split);
      if (magnitude.defined())
        magnitude = permute_rope_rows(magnitude, heads, c.rope_style, RopeStyle::half_split);
    }
    if (where.rows) {
      if (magnitude.defined())
        throw Error(
            "peft format: DoRA on gpt2's q, k or v cannot be written (peft fuses them in c_attn)");
      fused[where.path].emplace_back(where.row0, a, b * scaling);
      continue;
    }
    const auto r = a.size(0);
    const double alpha = s.rslora ? scaling * std::sqrt(static_cast<double>(r)) : scaling * r;
    out[prefix + ".lora_A.weight"] = a.contiguous();
    out[prefix + ".lora_B.weight"] = b.contiguous();
    if (magnitude.defined()) out[prefix + ".lora_magnitude_vector"] = magnitude.contiguous();
    if (r != s.r) rank_pattern[where.path] = r;
    if (std::abs(alpha - s.alpha) > 1e-12 * std::max(1.0, s.alpha))
      alpha_pattern[where.path] = alpha;
  }
  for (const auto& [path, parts] : fused) {
    std::int64_t rank = 0;
    for (const auto& p : parts) rank += std::get<1>(p).size(0);
    const auto in = std::get<1>(parts.front()).size(1);
    auto a = torch::zeros({rank, in}), b = torch::zeros({3 * c.hidden_size, rank});
    std::int64_t col = 0;
    for (const auto& [row0, pa, pb] : parts) {
      const auto r = pa.size(0);
      a.narrow(0, col, r).copy_(pa);
      b.narrow(0, row0, pb.size(0)).narrow(1, col, r).copy_(pb);
      col += r;
    }
    out[kPrefix + path + ".lora_A.weight"] = a;
    out[kPrefix + path + ".lora_B.weight"] = b;
    rank_pattern[path] = rank;  // the blocks carry their scaling: the module's own is 1
    alpha_pattern[path] =
        s.rslora ? std::sqrt(static_cast<double>(rank)) : static_cast<double>(rank);
  }
  const auto saved =
      peft_shared::write(methods, model, wrapped, peft_shared::Extras::modules_and_biases);
  out.insert(saved.tensors.begin(), saved.tensors.end());
  auto cfg = peft_shared::config("LORA", model, saved);
  cfg.update({{"r", s.r},
              {"lora_alpha", s.alpha},
              {"lora_dropout", s.dropout},
              {"use_rslora", s.rslora},
              {"use_dora", s.dora},
              {"target_modules", peft::target_modules(model, wrapped_modules)},
              {"rank_pattern", rank_pattern},
              {"alpha_pattern", alpha_pattern},
              {"bias", saved.bias},
              {"fan_in_fan_out", c.family == "gpt2"},
              {"init_lora_weights", true}});
  peft::write_adapter(dir, cfg, out);
}

}  // namespace graft::plugins::lora
