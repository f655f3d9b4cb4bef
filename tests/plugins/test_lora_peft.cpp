// LoRA in Hugging Face peft's format: a folder written the way peft writes it loads with the
// outputs peft's rules give (W + alpha/r B A, per-module rank and alpha patterns), and graft's
// adapters written as peft read back to the same outputs, for every family.
#include <graft/adapter.h>
#include <graft/io/file.h>
#include <graft/io/safetensors.h>
#include <graft/load.h>
#include <graft/plugin.h>
#include <torch/torch.h>

#include <fstream>
#include <nlohmann/json.hpp>

#include "method_params.h"
#include "numeric.h"
#include "support.h"
#include "tiny_models.h"

using namespace graft;
using graft::test::params;
using graft::test::TempDir;
using graft::test::tiny_model;

namespace {

at::Tensor out_of(Model& m) {
  return graft::test::model_outputs(m, torch::tensor({{3, 7, 1, 9, 4}}, torch::kLong));
}

void require_lora() {
  load_plugins();
  bool found = false;
  for (const auto& f : adapter_formats()) found |= f.name == "peft" && f.method == "lora";
  REQUIRE_MESSAGE(found, "the lora plugin's peft format is not registered");
}

}  // namespace

TEST_CASE("a peft LoRA folder loads with peft's scaling and rank patterns") {
  require_lora();
  TempDir dir;
  auto model = tiny_model("llama", 2);
  auto expected = tiny_model("llama", 2);  // merged by hand below
  const auto& c = model->config();
  torch::manual_seed(3);
  io::TensorMap t;
  auto params = expected->named_parameters();
  torch::NoGradGuard ng;
  for (int l = 0; l < c.num_layers; ++l) {
    for (const std::string proj : {"q", "v"}) {
      const std::string module =
          "model.layers." + std::to_string(l) + ".self_attn." + proj + "_proj";
      const bool patterned = l == 1 && proj == "v";
      const std::int64_t r = patterned ? 3 : 2;
      const double alpha = patterned ? 6.0 : 4.0;  // lora_alpha 4, alpha_pattern 6 on layer 1's v
      auto& w = params["layers." + std::to_string(l) + ".attn." + proj + ".weight"];
      auto a = torch::randn({r, w.size(1)}), b = torch::randn({w.size(0), r});
      t["base_model.model." + module + ".lora_A.weight"] = a;
      t["base_model.model." + module + ".lora_B.weight"] = b;
      w.add_(torch::matmul(b, a) * (alpha / r));
    }
  }
  io::write_safetensors(dir / "adapter_model.safetensors", t);
  nlohmann::json cfg = {{"peft_type", "LORA"},
                        {"r", 2},
                        {"lora_alpha", 4},
                        {"target_modules", {"q_proj", "v_proj"}},
                        {"rank_pattern", {{"model.layers.1.self_attn.v_proj", 3}}},
                        {"alpha_pattern", {{"layers.1.self_attn.v_proj", 6}}},
                        {"use_rslora", false},
                        {"task_type", "CAUSAL_LM"}};
  io::write_atomically(dir / "adapter_config.json", [&](std::ostream& o) { o << cfg.dump(); });
  auto methods = load_adapter(dir.path(), *model);
  REQUIRE(methods.size() == 1);
  CHECK(methods[0]->name() == "lora");
  // The expected model has the deltas merged into its weights: sums in another order.
  const auto expected_out = out_of(*expected);
  GRAFT_CHECK_CLOSE(out_of(*model), expected_out,
                    graft::test::forward_tolerance(*model, expected_out, 5));

  // A module the model lacks is named in the error.
  t["base_model.model.model.layers.9.self_attn.q_proj.lora_A.weight"] = torch::zeros({2, 16});
  io::write_safetensors(dir / "adapter_model.safetensors", t);
  auto fresh = tiny_model("llama", 2);
  CHECK_THROWS_WITH_AS(load_adapter(dir.path(), *fresh),
                       doctest::Contains("model.layers.9.self_attn.q_proj"), FileError);
}

TEST_CASE("graft LoRA adapters written as peft read back with the same outputs") {
  require_lora();
  struct Setting {
    std::string family, targets;
    bool rslora, dora;
  };
  for (const auto& s : std::vector<Setting>{{"llama", "attn.q,attn.v", false, false},
                                            {"llama", "all-linear", true, true},
                                            {"gpt2", "attn.q,attn.v,attn.o,ffn.up", false, false},
                                            {"gpt2", "attn.k", true, false},
                                            {"bert", "attn.q,attn.v,ffn.down", false, false},
                                            {"bert", "attn.k,attn.o", false, true}}) {
    CAPTURE(s.family);
    CAPTURE(s.targets);
    auto model = tiny_model(s.family, 5);
    auto p = Params::map("m");
    auto targets = Params::list("m.targets");
    std::stringstream ss(s.targets);
    for (std::string t; std::getline(ss, t, ',');) targets.add(Params::scalar(t));
    p.set("targets", targets);
    p.set("r", Params::scalar("3"));
    p.set("alpha", Params::scalar("5"));
    p.set("rslora", Params::scalar(s.rslora ? "true" : "false"));
    p.set("dora", Params::scalar(s.dora ? "true" : "false"));
    auto lora = make_method("lora", p);
    lora->attach(*model);
    {
      torch::NoGradGuard ng;
      for (auto& [name, t] : lora->trainable_parameters()) t.add_(torch::randn_like(t) * 0.3);
    }
    const auto trained = out_of(*model);
    TempDir dir;
    save_adapter_as("peft", dir.path(), *model, {lora.get()});
    CHECK(std::filesystem::exists(dir / "adapter_model.safetensors"));
    auto cfg = nlohmann::json::parse(io::read_text_file(dir / "adapter_config.json"));
    CHECK(cfg["peft_type"] == "LORA");
    CHECK(cfg["use_dora"] == s.dora);
    auto names = io::read_safetensors(dir / "adapter_model.safetensors").tensors;
    if (s.family == "gpt2")
      CHECK(names.count("base_model.model.transformer.h.0.attn.c_attn.lora_A.weight"));
    if (s.family == "llama")
      CHECK(names.count("base_model.model.model.layers.1.self_attn.q_proj.lora_B.weight"));
    if (s.family == "bert")
      CHECK(names.count("base_model.model.bert.encoder.layer.0.attention.self.key.lora_A.weight") ==
            (s.targets.find("attn.k") != std::string::npos));

    auto fresh = tiny_model(s.family, 5);
    auto loaded = load_adapter(dir.path(), *fresh);
    // gpt2's q/k/v LoRAs become one block-diagonal c_attn LoRA: sums in another order.
    GRAFT_CHECK_CLOSE(out_of(*fresh), trained, graft::test::forward_tolerance(*fresh, trained, 5));
  }
  auto gpt2 = tiny_model("gpt2");
  auto p = Params::map("m");
  p.set("dora", Params::scalar("true"));
  auto dora = make_method("lora", p);
  dora->attach(*gpt2);
  TempDir dir;
  CHECK_THROWS_WITH_AS(save_adapter_as("peft", dir.path(), *gpt2, {dora.get()}),
                       doctest::Contains("DoRA on gpt2"), Error);
  CHECK_THROWS_WITH_AS(
      save_adapter_as("onnx", dir.path(), *gpt2, {dora.get()}),
      doctest::Contains("cannot write the \"onnx\" adapter format (formats: gguf, graft, peft)"),
      Error);
}

TEST_CASE(
    "whole modules and biases trained beside LoRA are written as peft's modules_to_save and bias") {
  require_lora();
  auto lora_with = [](Model& m, std::vector<std::string> parameters) {
    std::vector<std::unique_ptr<Method>> methods;
    methods.push_back(make_method("lora", params({{"r", "2"}})));
    auto list = Params::list("methods[1].parameters");
    for (const auto& p : parameters) list.add(Params::scalar(p));
    auto settings = Params::map("methods[1]");
    settings.set("parameters", list);
    methods.push_back(make_method("layer_select", settings));
    torch::NoGradGuard ng;
    for (auto& method : methods) {
      method->attach(m);
      for (auto& [name, t] : method->trainable_parameters()) t.add_(torch::randn_like(t) * 0.2);
    }
    return methods;
  };
  auto write_and_read = [](Model& m, std::vector<std::unique_ptr<Method>>& methods,
                           const std::string& family) {
    TempDir dir;
    std::vector<Method*> all;
    for (auto& x : methods) all.push_back(x.get());
    const auto trained = out_of(m);
    save_adapter_as("peft", dir.path(), m, all);
    auto cfg = nlohmann::json::parse(io::read_text_file(dir / "adapter_config.json"));
    auto tensors = io::read_safetensors(dir / "adapter_model.safetensors").tensors;
    auto fresh = tiny_model(family, 5);
    auto back = load_adapter(dir.path(), *fresh);
    REQUIRE(back.size() == 2);
    CHECK(back[1]->name() == "layer_select");
    GRAFT_CHECK_CLOSE(out_of(*fresh), trained, graft::test::forward_tolerance(*fresh, trained, 5));
    return std::make_pair(cfg, tensors);
  };
  torch::manual_seed(8);
  SUBCASE("bert: the classifier and the pooler are modules_to_save") {
    auto model = tiny_model("bert", 5);
    auto methods = lora_with(*model, {"head.weight", "head.bias", "pooler.weight", "pooler.bias"});
    auto [cfg, tensors] = write_and_read(*model, methods, "bert");
    CHECK(cfg["modules_to_save"] == nlohmann::json::array({"bert.pooler.dense", "classifier"}));
    CHECK(cfg["bias"] == "none");
    CHECK(tensors.count("base_model.model.classifier.bias"));
    CHECK(tensors.count("base_model.model.bert.pooler.dense.weight"));
  }
  SUBCASE("gpt2: every bias is bias all, the adapted layers' alone are lora_only") {
    auto model = tiny_model("gpt2", 5);
    std::vector<std::string> every, adapted;
    for (const auto& p : model->named_parameters())
      if (p.key().size() > 5 && p.key().substr(p.key().size() - 5) == ".bias") {
        every.push_back(p.key());
        if (p.key().find(".attn.q.") != std::string::npos ||
            p.key().find(".attn.k.") != std::string::npos ||
            p.key().find(".attn.v.") != std::string::npos)
          adapted.push_back(p.key());
      }
    auto all = lora_with(*model, every);
    auto [cfg, tensors] = write_and_read(*model, all, "gpt2");
    CHECK(cfg["bias"] == "all");
    CHECK(tensors.count("base_model.model.transformer.h.0.attn.c_attn.base_layer.bias"));
    CHECK(tensors.count("base_model.model.transformer.h.0.ln_1.bias"));
    for (auto& m : all) m->detach(*model);
    auto only = lora_with(*model, adapted);
    auto [cfg2, tensors2] = write_and_read(*model, only, "gpt2");
    CHECK(cfg2["bias"] == "lora_only");
    CHECK(tensors2.count("base_model.model.transformer.h.1.attn.c_attn.base_layer.bias"));
    CHECK_FALSE(tensors2.count("base_model.model.transformer.h.1.ln_1.bias"));
  }
  SUBCASE("what peft has no place for is refused in one line") {
    auto model = tiny_model("bert", 5);
    auto half = lora_with(*model, {"head.weight"});
    TempDir dir;
    CHECK_THROWS_WITH_AS(
        save_adapter_as("peft", dir.path(), *model, {half[0].get(), half[1].get()}),
        doctest::Contains("only the weight of 'classifier'"), Error);
    for (auto& m : half) m->detach(*model);
    auto some = lora_with(*model, {"layers.0.ffn.up.bias"});
    CHECK_THROWS_WITH_AS(
        save_adapter_as("peft", dir.path(), *model, {some[0].get(), some[1].get()}),
        doctest::Contains("neither"), Error);
  }
}

TEST_CASE(
    "a hybrid adapter exports to peft one folder per method, or names what peft cannot hold") {
  require_lora();
  auto model = tiny_model("llama", 6);
  auto lora = make_method("lora", params({{"r", "2"}}));
  auto ia3 = make_method("ia3", params({}));
  lora->attach(*model);
  ia3->attach(*model);
  {
    torch::NoGradGuard ng;
    for (auto* m : {lora.get(), ia3.get()})
      for (auto& [name, t] : m->trainable_parameters()) t.add_(torch::randn_like(t) * 0.3);
  }
  const auto trained = out_of(*model);
  TempDir dir;
  save_adapter_as("peft", dir.path(), *model, {lora.get(), ia3.get()});
  for (const std::string sub : {"lora", "ia3"}) {
    auto cfg = nlohmann::json::parse(io::read_text_file(dir / sub / "adapter_config.json"));
    CHECK(cfg["peft_type"] == (sub == "lora" ? "LORA" : "IA3"));
  }
  auto fresh = tiny_model("llama", 6);
  auto a = load_adapter(dir / "lora", *fresh);
  auto b = load_adapter(dir / "ia3", *fresh);
  GRAFT_CHECK_CLOSE(out_of(*fresh), trained, graft::test::forward_tolerance(*fresh, trained, 5));
  // One file cannot hold two methods.
  CHECK_THROWS_WITH_AS(save_adapter_as("peft", dir / "x.gguf", *model, {lora.get(), ia3.get()}),
                       doctest::Contains("need a folder, one sub-folder each; the \"peft\" format "
                                         "holds lora, ia3: export those alone with --method"),
                       Error);

  // A bottleneck adapter has no place in peft: named, with the methods that can go.
  auto pfeiffer = make_method("pfeiffer", params({}));
  pfeiffer->attach(*model);
  TempDir other;
  CHECK_THROWS_WITH_AS(
      save_adapter_as("peft", other.path(), *model, {lora.get(), ia3.get(), pfeiffer.get()}),
      doctest::Contains("no place for pfeiffer"), Error);
  CHECK_THROWS_WITH_AS(
      save_adapter_as("peft", other.path(), *model, {lora.get(), ia3.get(), pfeiffer.get()}),
      doctest::Contains("holds lora, ia3: export those alone with --method"), Error);
}

TEST_CASE("peft exports record the base model as peft does: base_model_name_or_path") {
  require_lora();
  TempDir dir;
  auto base = tiny_model("llama", 2);
  base->set_tokenizer(graft::test::toy_tokenizer(base->config().vocab_size));
  save_hf_model(*base, dir / "base");
  auto export_from = [&](const std::filesystem::path& folder) {
    auto loaded = load_model(folder.string());
    auto lora = make_method("lora", params({{"r", "2"}}));
    lora->attach(*loaded.model);
    const auto out = dir / ("peft-" + folder.filename().string());
    save_adapter_as("peft", out, *loaded.model, {lora.get()});
    return nlohmann::json::parse(io::read_text_file(out / "adapter_config.json"))
        .at("base_model_name_or_path");
  };
  CHECK(export_from(dir / "base") == std::filesystem::absolute(dir / "base").string());
  // A folder whose config.json names its hub id (transformers writes _name_or_path).
  std::filesystem::copy(dir / "base", dir / "hub");
  auto config = nlohmann::json::parse(io::read_text_file(dir / "hub" / "config.json"));
  config["_name_or_path"] = "org/tiny-llama";
  std::ofstream(dir / "hub" / "config.json") << config.dump();
  CHECK(export_from(dir / "hub") == "org/tiny-llama");
  // A model made in memory has no origin: null, as before.
  auto lora = make_method("lora", params({{"r", "2"}}));
  lora->attach(*base);
  save_adapter_as("peft", dir / "mem", *base, {lora.get()});
  CHECK(nlohmann::json::parse(io::read_text_file(dir / "mem" / "adapter_config.json"))
            .at("base_model_name_or_path")
            .is_null());
}
