// graft new-plugin NAME DIR: writes a working skeleton plugin (a learned output scale on linear
// sites) that builds against an installed graft and tests itself.
#include <filesystem>
#include <fstream>
#include <iostream>
#include <regex>

#include "cli/options.h"
#include "util/file.h"

namespace graft::cli {
namespace {

constexpr const char* kCMake =
    R"~(# The {{name}} method as a graft plugin, built against an installed graft.
cmake_minimum_required(VERSION 3.18)
project({{name}} LANGUAGES CXX)

find_package(graft REQUIRED)
graft_add_plugin({{name}} SOURCES layer.cpp method.cpp)

# The plugin's own test: loads the plugin from this build folder, trains one step on a tiny model.
enable_testing()
add_executable({{name}}_test test.cpp)
target_link_libraries({{name}}_test PRIVATE graft::core)
target_compile_definitions({{name}}_test PRIVATE PLUGIN_DIR="$<TARGET_FILE_DIR:graft_plugin_{{name}}>")
add_test(NAME {{name}} COMMAND {{name}}_test)
)~";

constexpr const char* kConfig = R"~(// {{name}}'s settings.
#pragma once

#include <graft/method.h>

#include <nlohmann/json.hpp>

namespace {{name}} {

struct Config {
  double init = 1.0;    ///< the scale's starting value (1 = the base model, unchanged)
  graft::Selection selection;  ///< default targets: attn.v

  static Config from_params(const graft::Params& p) {
    graft::check_method_keys(p, {"init"});
    Config c;
    c.init = p.get_double("init", c.init);
    c.selection = graft::Selection::from_params(p, {"attn.v"});
    return c;
  }
  nlohmann::json to_json() const { return {{"init", init}, {"targets", selection.targets}}; }
};

}  // namespace {{name}}
)~";

constexpr const char* kLayerH =
    R"~(// {{name}}'s hook: a learned vector that scales a linear site's output.
#pragma once

#include <graft/hooks.h>

namespace {{name}} {

class OutputScale : public graft::LinearScale {
 public:
  OutputScale(std::int64_t width, double init);
  Side side() const override { return Side::output; }
  at::Tensor scale() override { return scale_; }

 private:
  at::Tensor scale_;  ///< [out]
};

}  // namespace {{name}}
)~";

constexpr const char* kLayerCpp = R"~(#include "layer.h"

#include <torch/torch.h>

namespace {{name}} {

OutputScale::OutputScale(std::int64_t width, double init) {
  scale_ = register_parameter("scale", torch::full({width}, init));
}

}  // namespace {{name}}
)~";

constexpr const char* kMethod =
    R"~(// {{name}}: a graft method plugin. attach() selects sites and attaches hooks; HookMethod does
// the rest (trainable parameters, saving and loading, detaching).
#include <graft/plugin.h>

#include "config.h"
#include "layer.h"

namespace {{name}} {
namespace {

class Method : public graft::HookMethod {
 public:
  explicit Method(Config c) : c_(std::move(c)) {}
  std::string name() const override { return "{{name}}"; }
  nlohmann::json config() const override { return c_.to_json(); }
  void attach(graft::Model& model) override {
    for (const auto& site : graft::select_sites(model, c_.selection, name())) {
      if (!graft::Model::is_linear_point(site.point))
        throw graft::Error("{{name}}: site '" + site.name + "' is not a linear projection");
      add_hook(model, site.name, std::make_shared<OutputScale>(site.out_features, c_.init));
    }
  }

 private:
  Config c_;
};

void register_methods(graft::Registry& registry) {
  graft::MethodInfo info;
  info.name = "{{name}}";
  info.version = "0.1.0";
  info.description = "a learned scale on linear outputs (a skeleton by graft new-plugin)";
  info.points = {"attn.q", "attn.k", "attn.v", "attn.o", "ffn.gate", "ffn.up", "ffn.down"};
  registry.add(info, [](const graft::Params& p) -> std::unique_ptr<graft::Method> {
    return std::make_unique<Method>(Config::from_params(p));
  });
}

}  // namespace
}  // namespace {{name}}

GRAFT_PLUGIN("{{name}}", "0.1.0", {{name}}::register_methods)
)~";

constexpr const char* kTest =
    R"~(// Loads the {{name}} plugin from its build folder, attaches it to a tiny llama model and trains
// one step: the method's parameters change, the base model does not.
#include <graft/load.h>
#include <graft/plugin.h>

#include <torch/torch.h>

#include <iostream>

int main() {
  int passed = 0, failed = 0;
  auto check = [&](bool ok, const char* what) {
    (ok ? passed : failed)++;
    if (!ok) std::cerr << "FAILED: " << what << "\n";
  };
  for (const auto& r : graft::load_plugins({PLUGIN_DIR}))
    if (!r.error.empty()) std::cerr << r.file << ": " << r.error << "\n";

  graft::ModelConfig c;
  c.family = "llama";
  c.vocab_size = 32;
  c.hidden_size = 16;
  c.num_layers = 2;
  c.num_heads = 4;
  c.num_kv_heads = 2;
  c.head_dim = 4;
  c.intermediate_size = 32;
  c.max_positions = 32;
  c.hidden_act = "silu";
  auto model = graft::make_model(c);
  graft::init_random(*model, 1, 0.2);
  for (auto& p : model->parameters()) p.set_requires_grad(false);
  auto before = model->named_parameters()["layers.0.attn.v.weight"].clone();

  auto method = graft::make_method("{{name}}", graft::Params::map());
  method->attach(*model);
  std::cout << graft::trainable_summary(*model, {method.get()}) << "\n";
  std::vector<at::Tensor> params;
  for (const auto& [name, t] : method->trainable_parameters()) params.push_back(t);
  check(params.size() == 2, "one scale per selected site");

  auto ids = torch::randint(c.vocab_size, {2, 8}, torch::kLong);
  auto loss = [&] {
    auto logits = model->forward({ids, {}, {}, {}}, nullptr).logits;
    return torch::cross_entropy_loss(logits.slice(1, 0, -1).reshape({-1, c.vocab_size}),
                                     ids.slice(1, 1).reshape({-1}));
  };
  torch::optim::AdamW opt(params, torch::optim::AdamWOptions(1e-2));
  const double l0 = loss().item<double>();
  opt.zero_grad();
  loss().backward();
  opt.step();
  check(loss().item<double>() < l0, "one step lowers the loss");
  check(torch::equal(model->named_parameters()["layers.0.attn.v.weight"], before), "the base is unchanged");
  std::cout << passed << " passed, " << failed << " failed\n";
  return failed ? 1 : 0;
}
)~";

constexpr const char* kReadme = R"~(# {{name}}

A graft method plugin, written by `graft new-plugin` as a starting point: a learned vector that
scales the output of the selected linear sites (initialised to `init`, so the model starts
unchanged).

| key | default | meaning |
|---|---|---|
| `init` | 1.0 | the scale's starting value |
| `targets`, `layers`, `leave_out` | attn.v, all, none | which sites (see graft's docs) |

**Trainable parameters:** the output width of each selected site. **Merging:** not implemented.

Build and test against an installed graft:

```sh
cmake -S . -B build -DCMAKE_PREFIX_PATH=/path/to/graft/install
cmake --build build && (cd build && ctest --output-on-failure)
graft methods --plugin-dir build   # lists {{name}}
```
)~";

std::string fill(std::string text, const std::string& name) {
  return std::regex_replace(text, std::regex(R"(\{\{name\}\})"), name);
}

}  // namespace

int run_new_plugin(const Args& args) {
  po::options_description desc("options");
  desc.add_options()("name", po::value<std::string>()->required(),
                     "method name (lowercase snake_case)")(
      "dir", po::value<std::string>()->required(), "folder to create");
  po::positional_options_description pos;
  pos.add("name", 1).add("dir", 1);
  po::variables_map vm;
  if (!parse(args, desc, vm, "usage: graft new-plugin NAME DIR", &pos)) return 0;
  const auto name = vm["name"].as<std::string>();
  if (!std::regex_match(name, std::regex("[a-z][a-z0-9_]*")))
    throw UsageError("NAME: expected lowercase snake_case (a-z, 0-9, _), got \"" + name + "\"");
  const std::filesystem::path dir = vm["dir"].as<std::string>();
  if (std::filesystem::exists(dir) && !std::filesystem::is_empty(dir))
    throw UsageError(dir.string() + ": already exists and is not empty");
  std::filesystem::create_directories(dir);
  const std::pair<const char*, const char*> files[] = {
      {"CMakeLists.txt", kCMake}, {"config.h", kConfig},   {"layer.h", kLayerH},
      {"layer.cpp", kLayerCpp},   {"method.cpp", kMethod}, {"test.cpp", kTest},
      {"README.md", kReadme}};
  for (const auto& [file, text] : files) {
    const auto body = fill(text, name);
    io::write_atomically(dir / file, [&](std::ostream& out) { out << body; });
  }
  std::cout << "wrote a " << name << " plugin skeleton to " << dir.string() << "\n";
  return 0;
}

}  // namespace graft::cli
