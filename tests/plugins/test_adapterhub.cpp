// AdapterHub's adapter folders written from graft adapters read back to the same numbers, and
// what graft does not implement is refused by name. (The reference suite checks that graft reads
// what AdapterHub itself wrote: tests/reference.)
#include <graft/adapter.h>
#include <graft/generate.h>
#include <graft/io/file.h>
#include <graft/io/safetensors.h>
#include <graft/plugin.h>
#include <torch/torch.h>

#include <fstream>
#include <nlohmann/json.hpp>

#include "method_params.h"
#include "numeric.h"
#include "support.h"
#include "tiny_models.h"

using namespace graft;
using graft::test::nudge;
using graft::test::params;
using graft::test::TempDir;

namespace {

at::Tensor outputs(Model& m) {
  torch::NoGradGuard ng;
  auto ids = torch::tensor({{1, 13, 6, 27, 38, 11}, {1, 8, 29, 0, 0, 0}}, torch::kLong);
  auto mask = torch::tensor({{1, 1, 1, 1, 1, 1}, {1, 1, 1, 0, 0, 0}}, torch::kLong);
  auto out = m.forward({ids, mask, {}, {}}, nullptr);
  return out.logits.defined() ? out.logits : out.hidden;
}

struct Case {
  const char* what;
  std::vector<std::pair<std::string, Params>> methods;
  bool bert_only = false;
};

}  // namespace

TEST_CASE("graft adapters written as AdapterHub adapters read back to the same outputs") {
  graft::test::load_test_plugins();
  const std::vector<Case> cases = {
      {"pfeiffer (seq_bn)", {{"pfeiffer", params({{"reduction_factor", "4"}})}}},
      {"houlsby with both norms, a gate and a learned scaling",
       {{"houlsby", params({{"reduction_factor", "4"},
                            {"ln_before", "true"},
                            {"ln_after", "true"},
                            {"gating", "true"},
                            {"scaling", "learned"}})}}},
      {"parallel (par_bn) with a scaling per channel",
       {{"parallel", params({{"reduction_factor", "4"}, {"scaling", "channel"}})}}},
      {"bottleneck closing the residual step itself",
       {{"bottleneck", params({{"reduction_factor", "2"},
                               {"original_ln_before", "false"},
                               {"original_ln_after", "false"},
                               {"residual_before_ln", "false"},
                               {"adapter_residual_before_ln", "true"},
                               {"ln_after", "true"},
                               {"non_linearity", "tanh"},
                               {"layers", "[1]"}})}}},
      {"compacter, one rule per layer",
       {{"compacter",
         params({{"reduction_factor", "2"}, {"n", "2"}, {"shared_phm_rule", "false"}})}}},
      {"compacter++, factorised rules, rank 2, plain W",
       {{"compacter++", params({{"reduction_factor", "2"},
                                {"n", "2"},
                                {"shared_phm_rule", "false"},
                                {"factorized_phm_rule", "true"},
                                {"factorized_phm_W", "false"}})}}},
      {"lora on attention and both feed-forward projections",
       {{"lora", params({{"r", "2"}, {"targets", "[attn.q, attn.k, attn.v, ffn.up, ffn.down]"}})}}},
      {"lora with a gate on q",
       {{"lora", params({{"r", "2"}, {"gating", "true"}, {"targets", "[attn.q]"}})}}},
      {"ia3 scaling outputs",
       {{"ia3", params({{"targets", "[attn.k, attn.v, ffn.up]"}, {"feedforward", "[]"}})}}},
      {"prefix tuning in AdapterHub's style, gated",
       {{"prefix_tuning", params({{"num_virtual_tokens", "3"},
                                  {"bottleneck", "8"},
                                  {"style", "adapterhub"},
                                  {"gating", "true"}})}}},
      {"prompt tuning after the embedding module",
       {{"prompt_tuning", params({{"num_virtual_tokens", "2"}, {"style", "adapterhub"}})}},
       true},
      {"a union: MAM's prefix and parallel adapter",
       {{"prefix_tuning",
         params({{"num_virtual_tokens", "4"}, {"bottleneck", "8"}, {"style", "adapterhub"}})},
        {"parallel", params({{"reduction_factor", "4"}})}}},
  };
  for (const std::string family : {"bert", "gpt2", "llama"}) {
    for (const auto& c : cases) {
      if (c.bert_only && family != "bert") continue;
      CAPTURE(family);
      CAPTURE(c.what);
      auto model = graft::test::tiny_model(family, 5);
      const auto base = outputs(*model);
      std::vector<std::unique_ptr<Method>> methods;
      std::vector<Method*> raw;
      for (const auto& [name, p] : c.methods) {
        methods.push_back(make_method(name, p));
        methods.back()->attach(*model);
        methods.back()->set_training(false);
        nudge(*methods.back(), 7 + methods.size());
        raw.push_back(methods.back().get());
      }
      const auto expected = outputs(*model);
      REQUIRE_FALSE(torch::allclose(expected, base));  // the adapter does something
      TempDir dir;
      save_adapter_as("adapters", dir / "hub", *model, raw);
      const auto cfg =
          nlohmann::json::parse(io::read_text_file(dir / "hub" / "adapter_config.json"));
      CHECK(cfg["name"] == "hub");
      CHECK(cfg["version"].get<std::string>().rfind("adapters.", 0) == 0);
      for (auto& m : methods) m->detach(*model);
      CHECK(torch::equal(outputs(*model), base));
      auto loaded = load_adapter(dir / "hub", *model);
      for (auto& m : loaded) m->set_training(false);
      CHECK(torch::equal(outputs(*model), expected));
      // And once more through graft's own format, from the AdapterHub-read methods.
      std::vector<Method*> again;
      for (auto& m : loaded) again.push_back(m.get());
      save_adapter(dir / "graft", *model, again);
      for (auto& m : loaded) m->detach(*model);
      auto reloaded = load_adapter(dir / "graft", *model);
      for (auto& m : reloaded) m->set_training(false);
      CHECK(torch::equal(outputs(*model), expected));
      for (auto& m : reloaded) m->detach(*model);
    }
  }
}

TEST_CASE("AdapterHub folders graft cannot read exactly are refused in one line") {
  graft::test::load_test_plugins();
  auto model = graft::test::tiny_model("bert", 5);
  auto pfeiffer = make_method("pfeiffer", params({{"reduction_factor", "4"}}));
  pfeiffer->attach(*model);
  TempDir dir;
  save_adapter_as("adapters", dir / "a", *model, {pfeiffer.get()});
  pfeiffer->detach(*model);
  const auto base = outputs(*model);
  const auto cfg_path = dir / "a" / "adapter_config.json";
  const auto original = io::read_text_file(cfg_path);
  auto rewrite = [&](const std::function<void(nlohmann::json&)>& edit) {
    auto j = nlohmann::json::parse(original);
    edit(j);
    std::ofstream(cfg_path) << j.dump(2);
  };
  auto refused = [&](const std::string& needle) {
    try {
      load_adapter(dir / "a", *model);
    } catch (const Error& e) {
      const std::string what = e.what();
      CHECK_MESSAGE(what.find(needle) != std::string::npos, what);
      CHECK(what.find('\n') == std::string::npos);
      CHECK(torch::equal(outputs(*model), base));  // nothing half-attached
      return;
    }
    FAIL("loaded: expected an error about " << needle);
  };
  SUBCASE("a setting that changes the computation") {
    rewrite([](nlohmann::json& j) { j["config"]["inv_adapter"] = "nice"; });
    refused("\"inv_adapter\"");
  }
  SUBCASE("a reduction factor per layer") {
    rewrite([](nlohmann::json& j) { j["config"]["reduction_factor"] = {{"default", 4}}; });
    refused("reduction_factor");
  }
  SUBCASE("a tensor no part takes") {
    auto t = io::read_safetensors(dir / "a" / "adapter.safetensors").tensors;
    t["bert.encoder.layer.0.output.adapters.a.extra"] = torch::zeros({2});
    io::write_safetensors(dir / "a" / "adapter.safetensors", t, {});
    refused("bert.encoder.layer.0.output.adapters.a.extra");
  }
  SUBCASE("only pickled weights") {
    std::filesystem::rename(dir / "a" / "adapter.safetensors", dir / "a" / "pytorch_adapter.bin");
    refused("never unpickles");
  }
  SUBCASE("a composition other than Stack") {
    std::filesystem::create_directories(dir / "setup");
    std::filesystem::rename(dir / "a", dir / "setup" / "a");
    std::ofstream(dir / "setup" / "adapter_setup.json")
        << R"({"adapter_setup": {"type": "Fuse", "children": ["a"]}, "head_setup": null,
               "version": "adapters.1.1.0"})";
    try {
      load_adapter(dir / "setup", *model);
      FAIL("a Fuse composition loaded");
    } catch (const Error& e) {
      CHECK(std::string(e.what()).find("\"Fuse\"") != std::string::npos);
    }
  }
}

TEST_CASE("shared compacter rules have no place in AdapterHub's saved files") {
  graft::test::load_test_plugins();
  auto model = graft::test::tiny_model("llama", 5);
  auto compacter = make_method("compacter", params({{"reduction_factor", "2"}, {"n", "2"}}));
  compacter->attach(*model);
  TempDir dir;
  CHECK_THROWS_WITH_AS(save_adapter_as("adapters", dir / "c", *model, {compacter.get()}),
                       doctest::Contains("shared_phm_rule"), Error);
  CHECK_FALSE(std::filesystem::exists(dir / "c"));
}

TEST_CASE("AdapterHub's prefixes give the same logits with the key/value cache as without it") {
  graft::test::load_test_plugins();
  for (const std::string family : {"gpt2", "llama"}) {
    for (const bool gating : {false, true}) {
      CAPTURE(family);
      CAPTURE(gating);
      auto model = graft::test::tiny_model(family, 5);
      auto prefix = make_method("prefix_tuning", params({{"num_virtual_tokens", "3"},
                                                         {"bottleneck", "8"},
                                                         {"style", "adapterhub"},
                                                         {"gating", gating ? "true" : "false"}}));
      prefix->attach(*model);
      prefix->set_training(false);
      nudge(*prefix, 11);
      torch::NoGradGuard ng;
      // The prompt at once, then one token at a time through the cache (as generation runs),
      // against forwards without a cache. Logits, not greedy tokens: a near tie between two
      // tokens may break either way under another BLAS kernel.
      const auto ids = torch::tensor({{1, 13, 6, 27, 3, 38, 9, 17}}, torch::kLong);
      const std::int64_t prompt = 4, total = ids.size(1);
      KVCache cache;
      const auto first = model->forward({ids.slice(1, 0, prompt), {}, {}, {}}, &cache).logits;
      const auto alone = model->forward({ids.slice(1, 0, prompt), {}, {}, {}}, nullptr).logits;
      GRAFT_CHECK_CLOSE(first, alone, graft::test::forward_tolerance(*model, alone, prompt + 3));
      if (gating) {
        // AdapterHub's gate is a mean over the positions of the forward that makes the prefix:
        // with a cache, the prompt's; without one, the whole sequence's, later tokens included.
        // So a gated prefix is not causal and the two differ, in AdapterHub as here.
        const auto whole = model->forward({ids, {}, {}, {}}, nullptr).logits;
        CHECK(graft::test::max_diff(whole.slice(1, 0, prompt), alone) >
              graft::test::forward_tolerance(*model, alone, total + 3));
        continue;
      }
      const auto whole = model->forward({ids, {}, {}, {}}, nullptr).logits;
      const auto tolerance = graft::test::forward_tolerance(*model, whole, total + 3);
      GRAFT_CHECK_CLOSE(first, whole.slice(1, 0, prompt), tolerance);
      for (std::int64_t i = prompt; i < total; ++i) {
        const auto step = model->forward({ids.slice(1, i, i + 1), {}, {}, {}}, &cache).logits;
        GRAFT_CHECK_CLOSE(step, whole.slice(1, i, i + 1), tolerance);
      }
      CHECK(cache.length() == total);
    }
  }
}
