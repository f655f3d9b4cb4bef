// Prompt tuning (Lester et al. 2021): P learned vectors prepended to the token embeddings. The mask
// is extended, labels of prompt positions are ignored and their outputs dropped (the core does
// both). Init `random` (N(0, 1) scaled to the embeddings' spread), `vocab` (copies of random token
// embeddings) or `text` (the embeddings of `init_text`, repeated or cut to length P). Reads and
// writes Hugging Face peft's PROMPT_TUNING format (prompt_embeddings [P, d]).
#include <ATen/CPUGeneratorImpl.h>
#include <graft/adapterhub.h>
#include <graft/peft.h>
#include <graft/plugin.h>
#include <torch/torch.h>

#include "../common/peft_shared.h"

namespace graft::plugins::prompt_tuning {
namespace {
namespace fs = std::filesystem;

class Prompt : public EmbeddingExtension {
 public:
  Prompt(at::Tensor init, bool after) : after_(after) {
    prompt_ = register_parameter("prompt", std::move(init));
  }
  bool after_embedding() const override { return after_; }
  at::Tensor prompt(std::int64_t batch) override {
    return prompt_.unsqueeze(0).expand({batch, -1, -1});
  }
  at::Tensor prompt_;

 private:
  bool after_;
};

struct Config {
  std::int64_t num_virtual_tokens = 10;
  std::string init = "random";
  std::string init_text;
  std::uint64_t seed = 0;  ///< for `vocab`: which tokens are copied
  /// peft: before the position embeddings and the embedding norm, the prompt taking the first
  /// positions; adapterhub: after the whole embedding module, the tokens keeping theirs (BERT).
  std::string style = "peft";
};

class PromptTuning : public HookMethod {
 public:
  explicit PromptTuning(const Params& p) : where_(p) {
    check_method_keys(p, {"num_virtual_tokens", "init", "init_text", "seed", "style"});
    c_.style = p.get_choice("style", {"peft", "adapterhub"}, c_.style);
    c_.num_virtual_tokens = p.get_positive_int("num_virtual_tokens", c_.num_virtual_tokens);
    c_.init = p.get_choice("init", {"random", "vocab", "text"}, c_.init);
    c_.init_text = p.get_string("init_text", "");
    c_.seed = static_cast<std::uint64_t>(p.get_int("seed", 0));
    if (c_.init == "text" && c_.init_text.empty())
      (p.has("init") ? p.at("init") : p).fail("init: text needs init_text: the text to start from");
    if (p.has("targets") || p.has("layers") || p.has("leave_out"))
      p.fail(
          "prompt_tuning always attaches at the embeddings; targets, layers and leave_out "
          "do not apply");
  }
  std::string name() const override { return "prompt_tuning"; }
  nlohmann::json config() const override {
    nlohmann::json j = {{"num_virtual_tokens", c_.num_virtual_tokens}, {"init", c_.init}};
    if (!c_.init_text.empty()) j["init_text"] = c_.init_text;
    if (c_.seed) j["seed"] = c_.seed;
    if (c_.style != "peft") j["style"] = c_.style;
    return j;
  }

  void attach(Model& model) override {
    auto modules = model.named_modules("", false);
    auto table = modules.contains("embed")
                     ? modules["embed"]->named_parameters(false)["weight"].detach()
                     : at::Tensor();
    if (!table.defined()) throw Error("prompt_tuning: this model has no token embedding table");
    const auto P = c_.num_virtual_tokens, d = table.size(1);
    const auto positions = model.config().max_positions;
    if (c_.style == "peft" && positions > 0 && P > positions)
      throw Error("prompt_tuning: num_virtual_tokens " + std::to_string(P) + " is more than the " +
                  std::to_string(positions) + " positions this model has");
    at::Tensor init;
    if (c_.init == "random") {
      init = torch::randn({P, d}) * table.to(torch::kFloat).std().item<double>();
    } else if (c_.init == "vocab") {
      auto gen = at::detail::createCPUGenerator(c_.seed);
      auto ids = torch::randint(table.size(0), {P}, gen, torch::kLong);
      init = table.index_select(0, ids.to(table.device())).to(torch::kFloat).cpu();
    } else {
      const auto* tok = model.tokenizer();
      if (!tok)
        where_.fail(
            "prompt_tuning: init: text needs the model's tokenizer, and this model has "
            "none; use init: vocab or random");
      auto ids = tok->encode(c_.init_text, false);
      if (ids.empty()) where_.fail("prompt_tuning: init_text encodes to no tokens");
      std::vector<std::int64_t> repeated;
      for (std::int64_t i = 0; i < P; ++i) repeated.push_back(ids[i % ids.size()]);
      init = table.index_select(0, torch::tensor(repeated, torch::kLong).to(table.device()))
                 .to(torch::kFloat)
                 .cpu();
    }
    auto hook = std::make_shared<Prompt>(init.contiguous(), c_.style == "adapterhub");
    hook->to(table.device());
    add_hook(model, "embed", hook);
  }

 private:
  Config c_;
  Params where_;

 public:
  const Config& settings() const { return c_; }
};

bool detect_peft(const fs::path& dir) { return peft::is_adapter(dir, "PROMPT_TUNING"); }

std::vector<std::unique_ptr<Method>> read_peft(const fs::path& dir, Model& model) {
  const auto cfg_path = (dir / "adapter_config.json").string();
  const auto where = peft::tensors_path(dir);
  const auto cfg = peft::read_config(dir);
  // The tensor's shape answers the sizes; the initialisation is what the saved values replaced.
  peft::check_config(cfg, cfg_path,
                     {"num_virtual_tokens", "token_dim", "num_transformer_submodules",
                      "num_attention_heads", "num_layers"});
  auto tensors = peft::read_tensors(dir);
  auto it = tensors.find("prompt_embeddings");
  if (it == tensors.end()) throw FileError(where, "has no 'prompt_embeddings' tensor");
  const auto& t = it->second;
  if (t.dim() != 2 || t.size(1) != model.config().hidden_size)
    throw FileError(where, "'prompt_embeddings' has shape " + c10::str(t.sizes()) +
                               " but this model's embeddings are " +
                               std::to_string(model.config().hidden_size) + " wide");
  if (cfg.value("num_transformer_submodules", 1) != 1)
    throw FileError(cfg_path, "num_transformer_submodules is not 1 (an encoder-decoder adapter)");
  auto settings = Params::map("", Source{cfg_path, 0, 0});
  settings.set("num_virtual_tokens", Params::scalar(std::to_string(t.size(0)), "num_virtual_tokens",
                                                    Source{cfg_path, 0, 0}));
  auto method = std::make_unique<PromptTuning>(settings);
  method->attach(model);
  method->load_state({{"embed.prompt", t}}, where);
  tensors.erase(it);
  std::vector<std::unique_ptr<Method>> methods;
  methods.push_back(std::move(method));
  peft_shared::read(tensors, model, where, methods);
  return methods;
}

void write_peft(const std::vector<Method*>& methods, const Model& model, const fs::path& dir) {
  auto* m = dynamic_cast<PromptTuning*>(methods.at(0));
  if (m && m->settings().style != "peft")
    throw Error(
        "peft format: prompt_tuning in AdapterHub's style (after the embedding module) "
        "has no peft equivalent; export it as adapters");
  auto state = methods.at(0)->state();
  const auto& c = model.config();
  const auto prompt = state.at("embed.prompt").detach().to(torch::kFloat).contiguous();
  auto saved = peft_shared::write(methods, model, {}, peft_shared::Extras::prompt_learning);
  saved.tensors["prompt_embeddings"] = prompt;
  auto cfg = peft_shared::config("PROMPT_TUNING", model, saved);
  cfg.update({{"num_virtual_tokens", prompt.size(0)},
              {"token_dim", c.hidden_size},
              {"num_transformer_submodules", 1},
              {"num_attention_heads", c.num_heads},
              {"num_layers", c.num_layers},
              {"prompt_tuning_init", "RANDOM"}});
  peft::write_adapter(dir, cfg, saved.tensors);
}

// AdapterHub's PromptTuningConfig (BERT family): "<base>prompt_tuning.prompt_tunings.<name>.
// prompt_embedding.weight" [P, d], prepended after the embedding module (combine "prefix").
bool reads_hub_part(const nlohmann::json& part) {
  return part.value("architecture", nlohmann::json()) == "prompt_tuning";
}

std::string hub_key(const Model& model, const std::string& name) {
  return adapterhub::base_prefix(model.config()) + "prompt_tuning.prompt_tunings." + name +
         ".prompt_embedding.weight";
}

std::vector<std::unique_ptr<Method>> read_hub_part(const nlohmann::json& part,
                                                   const std::string& name, io::TensorMap& tensors,
                                                   Model& model, const std::string& source) {
  adapterhub::check_part(part, source, {"prompt_length", "combine"});
  if (part.value("combine", std::string("prefix")) != "prefix")
    throw FileError(source, "prompt tuning combine " + part.at("combine").dump() +
                                " is not implemented (graft prepends: \"prefix\")");
  const auto t = adapterhub::take(tensors, hub_key(model, name), source);
  if (t.dim() != 2 || t.size(1) != model.config().hidden_size)
    throw FileError(source, "'" + hub_key(model, name) + "' has shape " + c10::str(t.sizes()) +
                                " but this model's embeddings are " +
                                std::to_string(model.config().hidden_size) + " wide");
  const Source where{source, 0, 0};
  auto settings = Params::map("", where);
  settings.set("num_virtual_tokens",
               Params::scalar(std::to_string(t.size(0)), "prompt_length", where));
  settings.set("style", Params::scalar("adapterhub", "architecture", where));
  return adapterhub::attach_part(std::make_unique<PromptTuning>(settings), model, source,
                                 [&](Method&) {
                                   return io::TensorMap{{"embed.prompt", t}};
                                 });
}

std::pair<nlohmann::json, io::TensorMap> write_hub_part(Method& method, const Model& model,
                                                        const std::string& name) {
  auto* m = dynamic_cast<PromptTuning*>(&method);
  if (!m) throw Error(method.name() + ": not a prompt_tuning method");
  if (m->settings().style != "adapterhub")
    throw Error(
        "adapters format: prompt_tuning in peft's style (before the position embeddings) "
        "has no AdapterHub equivalent; train with style: adapterhub");
  const auto prompt = method.state().at("embed.prompt");
  nlohmann::json part = {{"architecture", "prompt_tuning"},
                         {"prompt_length", prompt.size(0)},
                         {"prompt_init", "random_uniform"},
                         {"prompt_init_text", nullptr},
                         {"combine", "prefix"}};
  return {part, {{hub_key(model, name), prompt}}};
}

void register_prompt_tuning(Registry& registry) {
  MethodInfo info;
  info.name = "prompt_tuning";
  info.version = "1.0.0";
  info.description = "learned vectors prepended to the token embeddings (random/vocab/text init)";
  info.points = {"embed"};
  registry.add(info, [](const Params& p) -> std::unique_ptr<Method> {
    return std::make_unique<PromptTuning>(p);
  });
  registry.add_format({"peft", "prompt_tuning", detect_peft, read_peft, write_peft, {}, {}, {}});
  registry.add_format(
      adapterhub::part_format("prompt_tuning", reads_hub_part, read_hub_part, write_hub_part));
}

}  // namespace
}  // namespace graft::plugins::prompt_tuning

GRAFT_PLUGIN("prompt_tuning", "1.0.0", graft::plugins::prompt_tuning::register_prompt_tuning)
