// IA3 in Hugging Face peft's format: adapter_config.json (peft_type "IA3", target_modules,
// feedforward_modules) and tensors base_model.model.<module>.ia3_l, shaped [out, 1] for a scaled
// output and [1, in] for a scaled input (a feed-forward module). GPT-2's q, k and v share the fused
// c_attn: its vector covers all three, so graft writes ones for the unscaled parts and reads each
// part onto its site (a part that is all ones is left out).
#include <graft/peft.h>
#include <torch/torch.h>

#include <map>
#include <set>

#include "../common/peft_shared.h"
#include "ia3.h"

namespace graft::plugins::ia3 {
namespace fs = std::filesystem;
using nlohmann::json;

bool detect_peft(const fs::path& dir) { return peft::is_adapter(dir, "IA3"); }

std::vector<std::unique_ptr<Method>> read_peft(const fs::path& dir, Model& model) {
  const auto cfg_path = (dir / "adapter_config.json").string();
  const auto where = peft::tensors_path(dir);
  const json cfg = peft::read_config(dir);
  // Which modules scale their input is answered by each vector's shape.
  peft::check_config(cfg, cfg_path, {"feedforward_modules"});
  auto tensors = peft::read_tensors(dir);
  const auto& c = model.config();
  const auto by_module = peft::index_modules(model);
  auto source = Source{cfg_path, 0, 0};
  auto targets = Params::list("target_modules", source);
  auto feedforward = Params::list("feedforward_modules", source);
  io::TensorMap state;
  std::vector<std::string> taken;
  std::set<std::string> modules;
  for (const auto& [key, t] : tensors) {
    const auto module = peft::module_of_tensor(key, ".ia3_l");
    if (module.empty()) continue;
    taken.push_back(key);
    modules.insert(module);
    auto it = by_module.find(module);
    if (it == by_module.end())
      throw FileError(where, "IA3 on module '" + module + "', which this " + c.family +
                                 " model does not have (an adapter for another model?)");
    if (t.dim() != 2 || (t.size(0) != 1 && t.size(1) != 1))
      throw FileError(where, "'" + key + "' has shape " + c10::str(t.sizes()) +
                                 "; expected [out, 1] or [1, in]");
    const bool input = t.size(0) == 1 && t.size(1) != 1;
    const auto v = t.reshape({-1}).to(torch::kFloat);
    for (const auto& [site, m] : it->second) {
      const auto width = input ? site.in_features : (m.rows ? m.rows : site.out_features);
      const auto part = input ? v : v.narrow(0, m.row0, std::min(width, v.size(0) - m.row0));
      if (part.size(0) != width)
        throw FileError(where, "'" + key + "' of shape " + c10::str(t.sizes()) +
                                   " does not fit site " + site.name);
      if (m.rows && torch::equal(part, torch::ones_like(part))) continue;  // unscaled third
      targets.add(Params::scalar(site.name, "target_modules", source));
      if (input) feedforward.add(Params::scalar(site.name, "feedforward_modules", source));
      state[site.name + ".ia3"] = part.contiguous();
    }
  }
  if (state.empty()) throw FileError(where, "holds no ia3_l tensors");
  peft::check_targets(cfg, model, modules, ".ia3_l", where);
  if (feedforward.items().empty())  // an empty list would mean the default, ffn.down
    feedforward.add(Params::scalar("none", "feedforward_modules", source));
  auto settings = Params::map("", source);
  settings.set("targets", targets);
  settings.set("feedforward", feedforward);
  auto method = std::make_unique<Ia3>(Ia3Config::from_params(settings));
  method->attach(model);
  method->load_state(state, where);
  for (const auto& key : taken) tensors.erase(key);
  std::vector<std::unique_ptr<Method>> methods;
  methods.push_back(std::move(method));
  peft_shared::read(tensors, model, where, methods);
  return methods;
}

void write_peft(const std::vector<Method*>& methods, const Model& model, const fs::path& dir) {
  auto* ia3 = dynamic_cast<Ia3*>(methods.at(0));
  if (!ia3) throw Error("peft format: not an IA3 method");
  const auto& c = model.config();
  io::TensorMap out;
  std::set<std::string> targets, feedforward;
  for (const auto& [site_name, hook] : ia3->hooks()) {
    const Site* site = model.find_site(site_name);
    const auto m = peft::module_of(c, *site);
    auto scale = std::dynamic_pointer_cast<Ia3Scale>(hook);
    const auto v = scale->ia3.detach().to(torch::kFloat);
    const std::string key = peft::kPrefix + m.path + ".ia3_l";
    targets.insert(m.path);
    if (scale->side() == LinearScale::Side::input) {
      feedforward.insert(m.path);
      out[key] = v.view({1, -1}).contiguous();
    } else if (m.rows) {
      if (!out.count(key)) out[key] = torch::ones({3 * c.hidden_size, 1});
      out[key].narrow(0, m.row0, m.rows).copy_(v.view({-1, 1}));
    } else {
      out[key] = v.view({-1, 1}).contiguous();
    }
  }
  const std::vector<std::string> modules(targets.begin(), targets.end());
  const auto saved = peft_shared::write(methods, model, modules, peft_shared::Extras::modules);
  out.insert(saved.tensors.begin(), saved.tensors.end());
  auto cfg = peft_shared::config("IA3", model, saved);
  cfg.update(
      {{"target_modules", modules},
       {"feedforward_modules", std::vector<std::string>(feedforward.begin(), feedforward.end())},
       {"fan_in_fan_out", c.family == "gpt2"},
       {"init_ia3_weights", true}});
  peft::write_adapter(dir, cfg, out);
}

}  // namespace graft::plugins::ia3
