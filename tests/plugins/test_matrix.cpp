// The shared method test matrix: every method runs the same checks on every family.
//   - trainable-parameter count by the method's formula
//   - a no-op at initialisation (where the method defines it so)
//   - gradients reach only the method's parameters: the frozen base is bit-identical after
//     optimizer steps, and the loss goes down
//   - save/load round trip onto a fresh base model
//   - merge equals unmerged, and unmerge restores the base (mergeable methods)
//   - bad settings are one clear error
#include <graft/adapter.h>
#include <graft/plugin.h>
#include <torch/torch.h>

#include <functional>

#include "support.h"
#include "tiny_models.h"

using namespace graft;
using graft::test::TempDir;
using graft::test::tiny_model;

namespace {

// Settings as a test writes them: {"r", "4"}, {"targets", "[attn.q, ffn.up]"}.
Params params(std::initializer_list<std::pair<std::string, std::string>> kv) {
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

using Count = std::function<std::int64_t(const ModelConfig&)>;

struct Case {
  std::string label;
  std::string method;
  Params settings;
  Count trainable;
  bool noop_at_init;
  bool mergeable;
};

std::int64_t kv_width(const ModelConfig& c) { return c.num_kv_heads * c.head_dim; }

std::vector<Case> cases() {
  return {
      {"lora defaults", "lora", params({{"r", "4"}}),
       [](const ModelConfig& c) {
         const auto d = c.hidden_size;
         return c.num_layers * (4 * (d + d) + 4 * (d + kv_width(c)));
       },
       true, true},
      {"lora all-linear, rslora, gaussian, rank pattern", "lora",
       params({{"r", "2"},
               {"alpha", "4"},
               {"rslora", "true"},
               {"init", "gaussian"},
               {"targets", "[all-linear]"},
               {"rank_pattern", ""}}),
       nullptr, true, true},
      {"lora dora on attn.o and ffn.down, layer 1", "lora",
       params({{"r", "3"}, {"dora", "true"}, {"targets", "[attn.o, ffn.down]"}, {"layers", "1"}}),
       [](const ModelConfig& c) {
         const auto d = c.hidden_size, q = c.num_heads * c.head_dim, f = c.intermediate_size;
         return 3 * (q + d) + d + 3 * (f + d) + d;
       },
       true, true},
      {"full", "full", params({}),
       [](const ModelConfig& c) {
         auto m = models::make_model(c);
         std::int64_t n = 0;
         for (const auto& p : m->parameters()) n += p.numel();
         return n;
       },
       true, false},
  };
}

// A rank pattern given as a nested map: r 2 everywhere but 5 on ffn sites of layer 0.
Case with_rank_pattern(Case c) {
  auto pattern = Params::map("methods[0].rank_pattern", Source{"recipe.yaml", 5, 5});
  pattern.set("layers.0.ffn.*", Params::scalar("5", "methods[0].rank_pattern.layers.0.ffn.*"));
  c.settings.set("rank_pattern", pattern);
  c.trainable = [](const ModelConfig& c) {
    std::int64_t n = 0;
    for (const auto& s : tiny_model(c.family)->sites()) {
      if (!Model::is_linear_point(s.point) || s.point == "head") continue;
      const std::int64_t r = s.layer == 0 && s.point.rfind("ffn.", 0) == 0 ? 5 : 2;
      n += r * (s.in_features + s.out_features);
    }
    return n;
  };
  return c;
}

ForwardInput batch_for(const Model& m) {
  auto ids = torch::tensor({3, 7, 1, 9, 4, 2, 5, 6, 8, 11, 0, 0}, torch::kLong).view({2, 6});
  auto mask = torch::tensor({1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0}, torch::kLong).view({2, 6});
  ForwardInput in{ids, mask, {}, {}};
  if (m.config().family == "bert") in.token_type_ids = torch::zeros_like(ids);
  return in;
}

at::Tensor outputs(Model& m) {
  torch::NoGradGuard ng;
  auto out = m.forward(batch_for(m), nullptr);
  return out.logits.defined() ? out.logits : out.hidden;
}

// A loss every family can compute: next-token cross-entropy for LMs, labels for classifiers.
at::Tensor loss(Model& m) {
  auto in = batch_for(m);
  auto out = m.forward(in, nullptr);
  if (m.config().family == "bert")
    return torch::cross_entropy_loss(out.logits, torch::tensor({0, 2}, torch::kLong));
  auto logits = out.logits.slice(1, 0, -1).reshape({-1, m.config().vocab_size});
  auto target = in.input_ids.slice(1, 1).reshape({-1});
  return torch::cross_entropy_loss(logits, target);
}

std::map<std::string, at::Tensor> snapshot(Model& m) {
  std::map<std::string, at::Tensor> s;
  for (const auto& p : m.named_parameters(true)) s[p.key()] = p.value().detach().clone();
  return s;
}

void load_test_plugins() {
  load_plugins();
  std::set<std::string> names;
  for (const auto& r : registered_methods()) names.insert(r.info.name);
  REQUIRE_MESSAGE(names.count("lora"), "the lora plugin was not found on the plugin path");
  REQUIRE_MESSAGE(names.count("full"), "the full plugin was not found on the plugin path");
}

}  // namespace

TEST_CASE("method matrix") {
  load_test_plugins();
  auto all = cases();
  all[1] = with_rank_pattern(all[1]);
  for (const auto& c : all) {
    for (const std::string family : {"llama", "gpt2", "bert"}) {
      CAPTURE(c.label);
      CAPTURE(family);
      torch::manual_seed(5);
      auto model = tiny_model(family, 11);
      const auto base_out = outputs(*model);
      const auto base = snapshot(*model);
      auto method = make_method(c.method, c.settings);
      method->attach(*model);

      // 1. trainable parameters by formula
      std::int64_t n = 0;
      for (const auto& [name, t] : method->trainable_parameters()) {
        n += t.numel();
        CHECK_MESSAGE(t.requires_grad(), name);
      }
      CHECK(n == c.trainable(model->config()));
      const auto summary = trainable_summary(*model, {method.get()});
      CHECK_MESSAGE(summary.rfind("trainable params: ", 0) == 0, summary);
      CHECK_MESSAGE(summary.find(" || all params: ") != std::string::npos, summary);

      // 2. a no-op at initialisation
      if (c.noop_at_init) CHECK(torch::allclose(outputs(*model), base_out, 1e-5, 1e-6));

      // 3. gradients only into the method's parameters; the loss goes down
      std::vector<at::Tensor> train;
      for (const auto& [name, t] : method->trainable_parameters()) train.push_back(t);
      torch::optim::AdamW opt(train, torch::optim::AdamWOptions(1e-2).weight_decay(0.0));
      method->set_training(true);
      const double before = loss(*model).item<double>();
      for (int step = 0; step < 5; ++step) {
        opt.zero_grad();
        loss(*model).backward();
        opt.step();
      }
      const double after = loss(*model).item<double>();
      method->set_training(false);
      CHECK(after < before);
      if (c.method != "full") {
        for (const auto& p : model->named_parameters(true)) {
          CHECK_MESSAGE(torch::equal(p.value(), base.at(p.key())), "base changed: " << p.key());
          CHECK_FALSE(p.value().grad().defined());
        }
      }
      const auto trained_out = outputs(*model);
      CHECK_FALSE(torch::allclose(trained_out, base_out, 1e-5, 1e-6));

      // 4. save and load onto a fresh copy of the base model
      TempDir dir;
      save_adapter(dir.path(), *model, {method.get()});
      auto fresh = tiny_model(family, 11);
      auto loaded = load_adapter(dir.path(), *fresh);
      REQUIRE(loaded.size() == 1);
      CHECK(loaded[0]->name() == c.method);
      CHECK(torch::allclose(outputs(*fresh), trained_out, 1e-6, 1e-7));

      // 5. merge equals unmerged; unmerge restores the base weights
      if (c.mergeable) {
        method->merge(*model);
        CHECK(method->merged());
        CHECK(torch::allclose(outputs(*model), trained_out, 1e-4, 1e-5));
        bool changed = false;
        for (const auto& p : model->named_parameters(true))
          changed |= !torch::equal(p.value(), base.at(p.key()));
        CHECK(changed);
        method->unmerge(*model);
        for (const auto& p : model->named_parameters(true))
          CHECK_MESSAGE(torch::allclose(p.value(), base.at(p.key()), 1e-5, 1e-6), p.key());
        CHECK(torch::allclose(outputs(*model), trained_out, 1e-5, 1e-6));
      } else {
        CHECK_THROWS_AS(method->merge(*model), Error);
      }
      method->detach(*model);
      // Detached, the model is the base again (to float tolerance after a merge round trip).
      if (c.method != "full") CHECK(torch::allclose(outputs(*model), base_out, 1e-5, 1e-6));
    }
  }
}

TEST_CASE("method settings errors are one clear line") {
  load_test_plugins();
  CHECK_THROWS_WITH_AS(
      make_method("lora", params({{"dropuot", "0.1"}})),
      "recipe.yaml:4:5: methods[0].dropuot: unknown key (did you mean \"dropout\"?)", ParamError);
  CHECK_THROWS_WITH_AS(make_method("lora", params({{"r", "eight"}})),
                       "recipe.yaml:4:5: methods[0].r: expected a positive integer, got \"eight\"",
                       ParamError);
  CHECK_THROWS_WITH_AS(make_method("lora", params({{"dropout", "1.5"}})),
                       doctest::Contains("expected a number in [0, 1)"), ParamError);
  CHECK_THROWS_WITH_AS(make_method("lora", params({{"init", "gausian"}})),
                       doctest::Contains("did you mean \"gaussian\"?"), ParamError);
  CHECK_THROWS_WITH_AS(make_method("lorra", params({})),
                       doctest::Contains("did you mean \"lora\"?"), Error);
  CHECK_THROWS_WITH_AS(make_method("full", params({{"r", "8"}})),
                       doctest::Contains("methods[0].r: unknown key"), ParamError);
  auto model = tiny_model("llama");
  auto typo = make_method("lora", params({{"targets", "[attn.qq]"}}));
  CHECK_THROWS_WITH_AS(typo->attach(*model), doctest::Contains("did you mean \"attn.q\"?"),
                       ParamError);
  auto none = make_method("lora", params({{"targets", "[layers.9.*]"}}));
  CHECK_THROWS_WITH_AS(none->attach(*model),
                       doctest::Contains("the points of this llama model are embed, attn.in"),
                       ParamError);
  auto not_linear = make_method("lora", params({{"targets", "[ffn.act]"}}));
  CHECK_THROWS_WITH_AS(not_linear->attach(*model), doctest::Contains("is not a linear projection"),
                       Error);
}

TEST_CASE("an adapter refuses a base model it was not trained on") {
  load_test_plugins();
  TempDir dir;
  auto model = tiny_model("llama");
  auto lora = make_method("lora", params({}));
  lora->attach(*model);
  save_adapter(dir.path(), *model, {lora.get()});

  auto other = models::make_model([] {
    auto c = graft::test::tiny_config("llama");
    c.hidden_size = 24;
    c.head_dim = 6;
    return c;
  }());
  CHECK_THROWS_WITH_AS(load_adapter(dir.path(), *other),
                       doctest::Contains("hidden_size 16, but this model has 24"), FileError);
  auto gpt2 = tiny_model("gpt2");
  CHECK_THROWS_WITH_AS(load_adapter(dir.path(), *gpt2), doctest::Contains("family \"llama\""),
                       FileError);
  CHECK_THROWS_WITH_AS(load_adapter(dir.path() / "nope", *model),
                       doctest::Contains("not an adapter folder"), FileError);
}
