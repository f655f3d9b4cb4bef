// LoHa adapters in Hugging Face peft's format: adapter_config.json (peft_type "LOHA", r, alpha,
// rank_pattern, alpha_pattern) and adapter_model.safetensors with, per adapted module,
//   base_model.model.<module>.hada_w1_a [out, r]   .hada_w1_b [r, in]
//   base_model.model.<module>.hada_w2_a [out, r]   .hada_w2_b [r, in]
// and delta W = (alpha / r) (w1_a w1_b) ⊙ (w2_a w2_b). peft's LoHa adapts nn.Linear (and
// convolutions, which graft's families do not have); GPT-2's Conv1D layers it does not adapt.
#include <graft/peft.h>
#include <graft/plugin.h>

#include <set>

#include "../common/peft_shared.h"
#include "loha.h"

namespace graft::plugins::loha {
namespace fs = std::filesystem;
using nlohmann::json;

namespace {

const char* kFactors[] = {"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"};

// A q or k site's rows move between transformers' order and the model's (graft runs loaded
// models in transformers' order; only a model built in memory can differ).
at::Tensor rows_to(const at::Tensor& t, const Site& site, const ModelConfig& c, RopeStyle from,
                   RopeStyle to) {
  if (site.point != "attn.q" && site.point != "attn.k") return t;
  return permute_rope_rows(t, site.point == "attn.q" ? c.num_heads : c.num_kv_heads, from, to);
}

}  // namespace

bool detect_peft(const fs::path& dir) { return peft::is_adapter(dir, "LOHA"); }

std::vector<std::unique_ptr<Method>> read_peft(const fs::path& dir, Model& model) {
  const auto cfg_path = (dir / "adapter_config.json").string();
  const auto where = peft::tensors_path(dir);
  const json cfg = peft::read_config(dir);
  peft::check_config(cfg, cfg_path, {"r", "alpha", "rank_pattern", "alpha_pattern"});
  auto tensors = peft::read_tensors(dir);
  const auto& c = model.config();
  const auto by_module = peft::index_modules(model);
  const double base_alpha = cfg.value("alpha", 8.0);
  peft_shared::Settings settings(cfg_path);
  std::vector<std::string> targets;
  auto ranks = settings.map("rank_pattern"), alphas = settings.map("alpha_pattern");
  io::TensorMap state;
  std::set<std::string> modules;
  for (const auto& [key, w1_a] : io::TensorMap(tensors)) {
    const auto module = peft::module_of_tensor(key, ".hada_w1_a");
    if (module.empty()) continue;
    modules.insert(module);
    auto it = by_module.find(module);
    if (it == by_module.end())
      throw FileError(where, "LoHa on module '" + module + "', which this " + c.family +
                                 " model does not have (an adapter for another model?)");
    const std::string prefix = key.substr(0, key.size() - std::string(".hada_w1_a").size());
    std::map<std::string, at::Tensor> f;
    for (const char* name : kFactors) {
      auto t = tensors.find(prefix + "." + name);
      if (t == tensors.end()) throw FileError(where, "missing '" + prefix + "." + name + "'");
      f[name] = t->second;
      tensors.erase(t);
    }
    const auto r = f["hada_w1_a"].size(1);
    double alpha = base_alpha;
    if (auto* v = peft::pattern_value(cfg, "alpha_pattern", module)) alpha = v->get<double>();
    for (const auto& [site, part] : it->second) {
      const auto rows = part.rows ? part.rows : site.out_features;
      const auto out_rows = [&](const at::Tensor& t) {
        return rows_to(t.narrow(0, part.row0, rows), site, c, RopeStyle::half_split, c.rope_style)
            .contiguous();
      };
      for (const auto* a : {"hada_w1_a", "hada_w2_a"})
        if (f[a].dim() != 2 || f[a].size(1) != r || f[a].size(0) < part.row0 + rows)
          throw FileError(where, "'" + prefix + "." + a + "' has shape " + c10::str(f[a].sizes()) +
                                     ", which does not fit site " + site.name);
      for (const auto* b : {"hada_w1_b", "hada_w2_b"})
        if (f[b].dim() != 2 || f[b].size(0) != r || f[b].size(1) != site.in_features)
          throw FileError(where, "'" + prefix + "." + b + "' has shape " + c10::str(f[b].sizes()) +
                                     ", which does not fit site " + site.name);
      targets.push_back(site.name);
      ranks.set(site.name, settings.scalar(std::to_string(r), "rank_pattern"));
      alphas.set(site.name, settings.scalar(alpha, "alpha_pattern"));
      state[site.name + ".hada_w1_a"] = out_rows(f["hada_w1_a"]);
      state[site.name + ".hada_w2_a"] = out_rows(f["hada_w2_a"]);
      state[site.name + ".hada_w1_b"] = f["hada_w1_b"];
      state[site.name + ".hada_w2_b"] = f["hada_w2_b"];
    }
  }
  if (targets.empty()) throw FileError(where, "holds no hada_w1_a tensors");
  peft::check_targets(cfg, model, modules, ".hada_w1_a", where);
  settings.set("r", cfg.value("r", std::int64_t{8}), "r");
  settings.set("alpha", base_alpha, "alpha");
  settings.set_list("targets", targets, "target_modules");
  settings.set("rank_pattern", ranks);
  settings.set("alpha_pattern", alphas);
  auto method = std::make_unique<Loha>(LohaConfig::from_params(settings.params()));
  method->attach(model);
  method->load_state(state, where);
  std::vector<std::unique_ptr<Method>> methods;
  methods.push_back(std::move(method));
  peft_shared::read(tensors, model, where, methods);
  return methods;
}

void write_peft(const std::vector<Method*>& methods, const Model& model, const fs::path& dir) {
  auto* loha = dynamic_cast<Loha*>(methods.at(0));
  if (!loha) throw Error("peft format: not a LoHa method");
  const auto& s = loha->settings();
  const auto& c = model.config();
  io::TensorMap out;
  json rank_pattern = json::object(), alpha_pattern = json::object();
  std::set<std::string> wrapped_modules;
  std::vector<std::string> wrapped;
  for (const auto& [site_name, hook] : loha->hooks()) {
    const Site* site = model.find_site(site_name);
    const auto where = peft::module_of(c, *site);
    if (where.rows)
      throw Error("peft format: peft's LoHa does not adapt gpt2's fused Conv1D c_attn (site " +
                  site_name + ")");
    auto d = std::dynamic_pointer_cast<LohaDelta>(hook);
    const std::string prefix = peft::kPrefix + where.path;
    out[prefix + ".hada_w1_a"] =
        rows_to(d->w1_a.detach(), *site, c, c.rope_style, RopeStyle::half_split).contiguous();
    out[prefix + ".hada_w2_a"] =
        rows_to(d->w2_a.detach(), *site, c, c.rope_style, RopeStyle::half_split).contiguous();
    out[prefix + ".hada_w1_b"] = d->w1_b.detach().contiguous();
    out[prefix + ".hada_w2_b"] = d->w2_b.detach().contiguous();
    wrapped_modules.insert(where.path);
    wrapped.push_back(where.path);
    const auto r = d->w1_a.size(1);
    const double alpha = d->scaling * static_cast<double>(r);
    if (r != s.r) rank_pattern[where.path] = r;
    if (std::abs(alpha - s.alpha) > 1e-12 * std::max(1.0, s.alpha))
      alpha_pattern[where.path] = alpha;
  }
  const auto saved = peft_shared::write(methods, model, wrapped, peft_shared::Extras::modules);
  out.insert(saved.tensors.begin(), saved.tensors.end());
  auto cfg = peft_shared::config("LOHA", model, saved);
  cfg.update({{"r", s.r},
              {"alpha", s.alpha},
              {"rank_dropout", 0.0},
              {"module_dropout", 0.0},
              {"use_effective_conv2d", false},
              {"target_modules", peft::target_modules(model, wrapped_modules)},
              {"rank_pattern", rank_pattern},
              {"alpha_pattern", alpha_pattern},
              {"init_weights", true}});
  peft::write_adapter(dir, cfg, out);
}

}  // namespace graft::plugins::loha
