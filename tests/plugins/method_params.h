// Helpers shared by the method tests: settings written the way a recipe gives them, and the
// in-tree plugins loaded.
#pragma once

#include <doctest/doctest.h>
#include <graft/params.h>
#include <graft/plugin.h>
#include <torch/torch.h>

#include <set>
#include <sstream>
#include <string>
#include <utility>

namespace graft::test {

// Settings as a test writes them: {"r", "4"}, {"targets", "[attn.q, ffn.up]"}.
inline Params params(std::initializer_list<std::pair<std::string, std::string>> kv) {
  auto p = Params::map("methods[0]", Source{"recipe.yaml", 3, 3});
  for (const auto& [k, v] : kv) {
    if (!v.empty() && v.front() == '[') {
      auto list = Params::list("methods[0]." + k, Source{"recipe.yaml", 4, 5});
      std::string body = v.substr(1, v.size() - 2), item;
      std::stringstream ss(body);
      while (std::getline(ss, item, ',')) {
        item.erase(0, item.find_first_not_of(' '));
        list.add(Params::scalar(item, "methods[0]." + k, Source{"recipe.yaml", 4, 5}));
      }
      p.set(k, list);
    } else {
      p.set(k, Params::scalar(v, "methods[0]." + k, Source{"recipe.yaml", 4, 5}));
    }
  }
  return p;
}

/// Moves every trainable tensor of `m` off its initial value (seeded), so that zero-initialised
/// parts (LoRA's B, a bottleneck's up projection) do something.
inline void nudge(Method& m, std::uint64_t seed) {
  torch::NoGradGuard ng;
  torch::manual_seed(seed);
  for (auto& [name, t] : m.trainable_parameters()) t.add_(torch::randn_like(t) * 0.3);
}

/// Loads the plugins built in this tree and checks that every method is there.
inline void load_test_plugins() {
  load_plugins();
  std::set<std::string> names;
  for (const auto& r : registered_methods()) names.insert(r.info.name);
  for (const char* name : {"lora", "full", "bitfit", "ia3", "bottleneck", "pfeiffer", "houlsby",
                           "parallel", "compacter", "compacter++", "prompt_tuning", "prefix_tuning",
                           "quantize", "krona", "intrinsic_said", "layer_select", "sparse", "loha"})
    REQUIRE_MESSAGE(names.count(name),
                    "the " << name << " plugin was not found on the plugin path");
}

}  // namespace graft::test
