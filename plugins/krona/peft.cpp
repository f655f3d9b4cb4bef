// peft's LoKr adapters read and written as krona: adapter_config.json (peft_type "LOKR", r,
// alpha, rank_pattern, alpha_pattern, decompose_both, decompose_factor) and, per adapted module,
//   base_model.model.<module>.lokr_w1 [a1, a2]  or  .lokr_w1_a [a1, r] and .lokr_w1_b [r, a2]
//   base_model.model.<module>.lokr_w2 [b1, b2]  or  .lokr_w2_a [b1, r] and .lokr_w2_b [r, b2]
// with delta W = (alpha / r) kron(w1, w2): krona's A and B with s = alpha / r. peft chooses the
// shapes by factorising out and in (decompose_factor) and keeps a factor as a rank-r product
// where r is below half its larger side; krona follows the same rules, so the stored layout is
// checked against them. Convolution factors (lokr_t2, use_effective_conv2d) have no place in
// graft's families and are refused.
#include <graft/peft.h>
#include <graft/plugin.h>

#include <set>

#include "../common/peft_shared.h"
#include "krona.h"

namespace graft::plugins::krona {
namespace fs = std::filesystem;
using nlohmann::json;

namespace {

const char* kSuffixes[] = {".lokr_w1", ".lokr_w1_a", ".lokr_w1_b",
                           ".lokr_w2", ".lokr_w2_a", ".lokr_w2_b"};

// Kronecker factors cannot follow a q/k row permutation: a model built in memory in the
// interleaved order cannot take (or give) them.
void check_row_order(const Site& site, const ModelConfig& c) {
  if ((site.point == "attn.q" || site.point == "attn.k") && c.rope_style != RopeStyle::half_split)
    throw Error("peft format: LoKr factors on " + site.name +
                " cannot be reordered to transformers' q/k rows (this model runs the interleaved "
                "order)");
}

}  // namespace

bool detect_peft(const fs::path& dir) { return peft::is_adapter(dir, "LOKR"); }

std::vector<std::unique_ptr<Method>> read_peft(const fs::path& dir, Model& model) {
  const auto cfg_path = (dir / "adapter_config.json").string();
  const auto where = peft::tensors_path(dir);
  const json cfg = peft::read_config(dir);
  peft::check_config(
      cfg, cfg_path,
      {"r", "alpha", "rank_pattern", "alpha_pattern", "decompose_both", "decompose_factor"});
  auto tensors = peft::read_tensors(dir);
  const auto& c = model.config();
  const auto by_module = peft::index_modules(model);
  const double base_alpha = cfg.value("alpha", 8.0);
  const std::int64_t base_r = cfg.value("r", std::int64_t{8});
  peft_shared::Settings settings(cfg_path);
  auto ranks = settings.map("rank_pattern"), scalings = settings.map("scaling_pattern");
  std::vector<std::string> targets;
  io::TensorMap state;
  std::set<std::string> modules;
  for (const auto& [key, t] : tensors)
    for (const char* suffix : kSuffixes)
      if (auto m = peft::module_of_tensor(key, suffix); !m.empty()) modules.insert(m);
  for (const auto& module : modules) {
    auto it = by_module.find(module);
    if (it == by_module.end())
      throw FileError(where, "LoKr on module '" + module + "', which this " + c.family +
                                 " model does not have (an adapter for another model?)");
    if (it->second.size() != 1 || it->second[0].second.rows)
      throw FileError(where, "LoKr on '" + module +
                                 "', a fused module graft splits; peft's LoKr does not adapt it");
    const Site& site = it->second[0].first;
    check_row_order(site, c);
    std::int64_t r = base_r;
    if (auto* v = peft::pattern_value(cfg, "rank_pattern", module)) r = v->get<std::int64_t>();
    double alpha = base_alpha;
    if (auto* v = peft::pattern_value(cfg, "alpha_pattern", module)) alpha = v->get<double>();
    // Each factor, full or as its two parts, under krona's names.
    const std::string prefix = peft::kPrefix + module;
    for (const auto& [peft_name, graft_name] :
         {std::pair<std::string, std::string>{"lokr_w1", "krona_A"}, {"lokr_w2", "krona_B"}}) {
      for (const std::string part : {"", "_a", "_b"}) {
        auto t = tensors.find(prefix + "." + peft_name + part);
        if (t == tensors.end()) continue;
        state[site.name + "." + graft_name + part] = t->second;
        tensors.erase(t);
      }
    }
    targets.push_back(site.name);
    ranks.set(site.name, settings.scalar(std::to_string(r), "rank_pattern"));
    scalings.set(site.name, settings.scalar(alpha / static_cast<double>(r), "alpha_pattern"));
  }
  if (targets.empty()) throw FileError(where, "holds no LoKr tensors");
  peft::check_targets(cfg, model, modules, " (lokr_w1 or lokr_w1_a)", where);
  settings.set("r", base_r, "r");
  settings.set("decompose_both", cfg.value("decompose_both", false), "decompose_both");
  settings.set("decompose_factor", cfg.value("decompose_factor", std::int64_t{-1}),
               "decompose_factor");
  settings.set("scaling", base_alpha / static_cast<double>(base_r), "alpha");
  settings.set_list("targets", targets, "target_modules");
  settings.set("rank_pattern", ranks);
  settings.set("scaling_pattern", scalings);
  auto method =
      std::make_unique<Krona>(KronaConfig::from_params(settings.params()), settings.params());
  method->attach(model);
  // peft's rules give the factors' layout from the config; a file that differs is not peft's.
  const auto expected = method->state();
  for (const auto& [name, t] : state)
    if (!expected.count(name) || expected.at(name).sizes() != t.sizes())
      throw FileError(where, "'" + name + "' (" + c10::str(t.sizes()) +
                                 ") is not the factor layout peft's LoKr gives this module with "
                                 "its r, decompose_both and decompose_factor");
  method->load_state(state, where);
  std::vector<std::unique_ptr<Method>> methods;
  methods.push_back(std::move(method));
  peft_shared::read(tensors, model, where, methods);
  return methods;
}

void write_peft(const std::vector<Method*>& methods, const Model& model, const fs::path& dir) {
  auto* krona = dynamic_cast<Krona*>(methods.at(0));
  if (!krona) throw Error("peft format: not a krona method");
  const auto& s = krona->settings();
  if (!s.a_shape.empty())
    throw Error(
        "peft format: LoKr's factor shapes come from decompose_factor; krona's a_shape "
        "has no place there");
  const auto& c = model.config();
  io::TensorMap out;
  std::set<std::string> wrapped_modules;
  std::vector<std::string> wrapped;
  // peft's rank per module: the rank of a decomposed factor, else one at least half the larger
  // side of each factor, so that peft keeps them full as they are here.
  std::vector<std::tuple<std::string, std::int64_t, double>> modules;  // path, r, alpha
  bool decompose_both = false;
  for (const auto& [site_name, hook] : krona->hooks()) {
    const Site* site = model.find_site(site_name);
    const auto where = peft::module_of(c, *site);
    if (where.rows)
      throw Error("peft format: peft's LoKr does not adapt gpt2's fused Conv1D c_attn (site " +
                  site_name + ")");
    check_row_order(*site, c);
    auto d = std::dynamic_pointer_cast<KronaDelta>(hook);
    const std::string prefix = peft::kPrefix + where.path;
    std::int64_t r = 0;
    for (const auto& [factor, name] :
         {std::pair<const Factor*, std::string>{&d->A, "lokr_w1"}, {&d->B, "lokr_w2"}}) {
      if (factor->decomposed()) {
        r = factor->a.size(1);
        out[prefix + "." + name + "_a"] = factor->a.detach().contiguous();
        out[prefix + "." + name + "_b"] = factor->b.detach().contiguous();
      } else {
        out[prefix + "." + name] = factor->full.detach().contiguous();
      }
    }
    decompose_both |= d->A.decomposed();
    if (!r) r = std::max({d->A.rows, d->A.cols, d->B.rows, d->B.cols});
    modules.emplace_back(where.path, r, d->scaling * static_cast<double>(r));
    wrapped_modules.insert(where.path);
    wrapped.push_back(where.path);
  }
  if (modules.empty()) throw Error("peft format: the krona method is attached nowhere");
  const auto [first, base_r, base_alpha] = modules.front();
  json rank_pattern = json::object(), alpha_pattern = json::object();
  for (const auto& [path, r, alpha] : modules) {
    if (r != base_r) rank_pattern[path] = r;
    if (std::abs(alpha - base_alpha) > 1e-12 * std::max(1.0, std::abs(base_alpha)))
      alpha_pattern[path] = alpha;
  }
  const auto saved = peft_shared::write(methods, model, wrapped, peft_shared::Extras::modules);
  out.insert(saved.tensors.begin(), saved.tensors.end());
  auto cfg = peft_shared::config("LOKR", model, saved);
  cfg.update({{"r", base_r},
              {"alpha", base_alpha},
              {"decompose_both", decompose_both},
              {"decompose_factor", s.factor},
              {"rank_dropout", 0.0},
              {"module_dropout", 0.0},
              {"rank_dropout_scale", false},
              {"use_effective_conv2d", false},
              {"target_modules", peft::target_modules(model, wrapped_modules)},
              {"rank_pattern", rank_pattern},
              {"alpha_pattern", alpha_pattern},
              {"init_weights", true}});
  peft::write_adapter(dir, cfg, out);
}

}  // namespace graft::plugins::krona
