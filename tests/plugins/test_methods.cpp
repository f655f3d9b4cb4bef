// What individual methods promise beyond the shared matrix: soft prompts with padding and the key/
// value cache, the peft formats of ia3, prefix_tuning and prompt_tuning, NF4's memory and error,
// the regenerated Fastfood projection, gradient-selected sparse entries, and the clear refusals.
#include <graft/adapter.h>
#include <graft/generate.h>
#include <graft/io/file.h>
#include <graft/io/safetensors.h>
#include <graft/load.h>
#include <graft/peft.h>
#include <torch/torch.h>

#include <fstream>
#include <set>

#include "method_params.h"
#include "numeric.h"
#include "support.h"
#include "tiny_models.h"

using namespace graft;
using graft::test::load_test_plugins;
using graft::test::params;
using graft::test::TempDir;
using graft::test::tiny_model;

namespace {

at::Tensor logits(Model& m, const at::Tensor& ids, const at::Tensor& mask = {}) {
  torch::NoGradGuard ng;
  return m.forward({ids, mask, {}, {}}, nullptr).logits;
}

// Some training so that the soft prompt is not at its initial value.
void nudge(Method& method) {
  torch::NoGradGuard ng;
  for (auto& [name, t] : method.trainable_parameters()) t.add_(torch::randn_like(t) * 0.3);
}

// A llama wide enough for NF4's blocks of 64, and a frozen model of it with reproducible weights.
ModelConfig qlora_config() {
  auto config = graft::test::tiny_config("llama");
  config.hidden_size = 64;
  config.head_dim = 16;
  config.intermediate_size = 128;
  return config;
}

std::shared_ptr<Model> frozen_model(const ModelConfig& config) {
  auto model = models::make_model(config);
  models::init_parameters(*model, 3, 0.05);
  for (auto& p : model->parameters()) p.set_requires_grad(false);
  return model;
}

}  // namespace

TEST_CASE("soft prompts work with padding on either side and with the key/value cache") {
  load_test_plugins();
  for (const std::string method : {"prefix_tuning", "prompt_tuning"}) {
    for (const std::string family : {"llama", "gpt2"}) {
      CAPTURE(method);
      CAPTURE(family);
      torch::manual_seed(3);
      auto model = tiny_model(family, 4);
      auto m = make_method(method, params({{"num_virtual_tokens", "3"}}));
      m->attach(*model);
      nudge(*m);
      auto ids = torch::tensor({5, 9, 2, 7}, torch::kLong).view({1, 4});
      const auto alone = logits(*model, ids);
      // Left padding: two pads before the tokens; right padding: two after.
      auto left = torch::tensor({0, 0, 5, 9, 2, 7}, torch::kLong).view({1, 6});
      auto left_mask = torch::tensor({0, 0, 1, 1, 1, 1}, torch::kLong).view({1, 6});
      auto right = torch::tensor({5, 9, 2, 7, 0, 0}, torch::kLong).view({1, 6});
      auto right_mask = torch::tensor({1, 1, 1, 1, 0, 0}, torch::kLong).view({1, 6});
      // Padding adds masked keys, whose zero weights change how the attention sums associate.
      const auto tolerance = graft::test::forward_tolerance(*model, alone, 6 + 8);
      GRAFT_CHECK_CLOSE(logits(*model, left, left_mask).slice(1, 2), alone, tolerance);
      GRAFT_CHECK_CLOSE(logits(*model, right, right_mask).slice(1, 0, 4), alone, tolerance);
      // Generation: the cache holds the prefix (or the prompt's keys); same tokens as recomputing.
      auto batch = torch::tensor({0, 0, 5, 9, 3, 8, 1, 4}, torch::kLong).view({2, 4});
      auto mask = torch::tensor({0, 0, 1, 1, 1, 1, 1, 1}, torch::kLong).view({2, 4});
      GenerationOptions cached, recomputed;
      cached.max_new_tokens = recomputed.max_new_tokens = 6;
      recomputed.use_cache = false;
      CHECK(torch::equal(generate(*model, batch, mask, cached),
                         generate(*model, batch, mask, recomputed)));
      m->detach(*model);
    }
  }
}

TEST_CASE("prefix tuning equals transformers' past_key_values: tokens numbered after the prefix") {
  load_test_plugins();
  for (const std::string family : {"llama", "gpt2"}) {
    CAPTURE(family);
    torch::manual_seed(2);
    auto model = tiny_model(family, 4);
    auto m = make_method("prefix_tuning", params({{"num_virtual_tokens", "3"}}));
    m->attach(*model);
    auto ids = torch::tensor({{6, 7, 2}}, torch::kLong);
    const auto with_prefix = logits(*model, ids);
    // The same prefix handed over as an already-filled cache of three positions.
    KVCache cache;
    for (std::int64_t l = 0; l < model->config().num_layers; ++l) {
      auto [k, v] = model->hooks("layers." + std::to_string(l) + ".attn.kv")
                        .kv.at(0)
                        ->prefix(torch::zeros({1, 1, model->config().hidden_size}));
      cache.keys.push_back(k.detach().clone());
      cache.values.push_back(v.detach().clone());
      cache.prefix.push_back(0);
    }
    cache.mask = torch::ones({1, 3}, torch::kLong);
    m->detach(*model);
    torch::NoGradGuard ng;
    const auto as_cache = model->forward({ids, {}, {}, {}}, &cache).logits;
    GRAFT_CHECK_CLOSE(with_prefix, as_cache, graft::test::forward_tolerance(*model, as_cache, 8));
  }
}

TEST_CASE("prompt tuning initialised from text acts as that text") {
  GRAFT_MODEL_OR_SKIP(path, "stories260K");
  load_test_plugins();
  auto loaded = load_model(path.string());
  auto& model = *loaded.model;
  // init_text is encoded without special tokens; P covers it exactly.
  const auto prompt_ids = loaded.tokenizer->encode("Once upon a time", false);
  const auto P = static_cast<std::int64_t>(prompt_ids.size());
  auto m = make_method("prompt_tuning", params({{"num_virtual_tokens", std::to_string(P)},
                                                {"init", "text"},
                                                {"init_text", "Once upon a time"}}));
  m->attach(model);
  auto rest =
      torch::tensor(loaded.tokenizer->encode(" there was", false), torch::kLong).view({1, -1});
  auto with_prompt = logits(model, rest);
  m->detach(model);
  std::vector<std::int64_t> all = prompt_ids;
  for (auto t : loaded.tokenizer->encode(" there was", false)) all.push_back(t);
  auto plain = logits(model, torch::tensor(all, torch::kLong).view({1, -1}));
  GRAFT_CHECK_CLOSE(with_prompt, plain.slice(1, P),
                    graft::test::forward_tolerance(model, plain, plain.size(1)));
}

TEST_CASE("ia3, prefix_tuning and prompt_tuning round-trip through peft's format") {
  load_test_plugins();
  const std::vector<std::pair<std::string, Params>> methods = {
      {"ia3", params({})},
      {"prefix_tuning", params({{"num_virtual_tokens", "3"}, {"bottleneck", "6"}})},
      {"prompt_tuning", params({{"num_virtual_tokens", "2"}})}};
  for (const auto& [name, settings] : methods) {
    for (const std::string family : {"llama", "gpt2", "bert"}) {
      CAPTURE(name);
      CAPTURE(family);
      torch::manual_seed(9);
      auto model = tiny_model(family, 2);
      auto m = make_method(name, settings);
      m->attach(*model);
      nudge(*m);
      auto ids = torch::tensor({{3, 8, 1, 6}}, torch::kLong);
      const auto trained = logits(*model, ids);
      TempDir dir;
      save_adapter_as("peft", dir.path(), *model, {m.get()});
      CHECK(peft::is_adapter(dir.path(), name == "ia3"             ? "IA3"
                                         : name == "prefix_tuning" ? "PREFIX_TUNING"
                                                                   : "PROMPT_TUNING"));
      auto fresh = tiny_model(family, 2);
      auto back = load_adapter(dir.path(), *fresh);
      REQUIRE(back.size() == 1);
      CHECK(back[0]->name() == name);
      // peft's layouts hold the same numbers (GPT-2's fused c_attn split again): bit for bit.
      CHECK(torch::equal(logits(*fresh, ids), trained));
    }
  }
}

TEST_CASE("peft's prefix layout: per token, layer l's keys then values, heads then head_dim") {
  load_test_plugins();
  auto model = tiny_model("llama");
  const auto& c = model->config();
  const std::int64_t kv = c.num_kv_heads * c.head_dim, P = 2;
  auto flat = torch::arange(P * c.num_layers * 2 * kv, torch::kFloat).view({P, -1});
  TempDir dir;
  peft::write_adapter(dir.path(),
                      {{"peft_type", "PREFIX_TUNING"},
                       {"task_type", "CAUSAL_LM"},
                       {"num_virtual_tokens", P},
                       {"token_dim", kv},
                       {"num_attention_heads", c.num_kv_heads},
                       {"num_layers", c.num_layers},
                       {"num_transformer_submodules", 1}},
                      {{"prompt_embeddings", flat}});
  auto loaded = load_adapter(dir.path(), *model);
  auto [k, v] =
      model->hooks("layers.1.attn.kv").kv.at(0)->prefix(torch::zeros({1, 1, c.hidden_size}));
  for (std::int64_t p = 0; p < P; ++p)
    for (std::int64_t h = 0; h < c.num_kv_heads; ++h) {
      CHECK(torch::equal(k[0][h][p], flat[p].narrow(0, 2 * kv + h * c.head_dim, c.head_dim)));
      CHECK(torch::equal(v[0][h][p], flat[p].narrow(0, 3 * kv + h * c.head_dim, c.head_dim)));
    }
}

TEST_CASE("peft's IA3 on gpt2's fused c_attn: each third goes to its site") {
  load_test_plugins();
  auto model = tiny_model("gpt2");
  const auto d = model->config().hidden_size;
  auto fused = torch::ones({3 * d, 1});
  fused.narrow(0, d, d).fill_(2.0);      // k
  fused.narrow(0, 2 * d, d).fill_(3.0);  // v
  TempDir dir;
  peft::write_adapter(dir.path(),
                      {{"peft_type", "IA3"},
                       {"target_modules", {"c_attn", "mlp.c_proj"}},
                       {"layers_to_transform", {0}},
                       {"feedforward_modules", {"mlp.c_proj"}}},
                      {{"base_model.model.transformer.h.0.attn.c_attn.ia3_l", fused},
                       {"base_model.model.transformer.h.0.mlp.c_proj.ia3_l",
                        torch::full({1, model->config().intermediate_size}, 0.5)}});
  auto loaded = load_adapter(dir.path(), *model);
  const auto& k = model->hooks("layers.0.attn.k").scales;
  const auto& q = model->hooks("layers.0.attn.q").scales;
  const auto& down = model->hooks("layers.0.ffn.down").scales;
  REQUIRE(k.size() == 1);
  CHECK(q.empty());  // an all-ones third is no scale at all
  CHECK(torch::equal(k[0]->scale(), torch::full({d}, 2.0)));
  CHECK(model->hooks("layers.0.attn.v").scales.at(0)->scale().eq(3.0).all().item<bool>());
  REQUIRE(down.size() == 1);
  CHECK(down[0]->side() == LinearScale::Side::input);
}

TEST_CASE("quantize holds the base in NF4: at most 0.3x of F32, dequantised within NF4's error") {
  load_test_plugins();
  torch::manual_seed(1);
  auto config = graft::test::tiny_config("llama");
  config.hidden_size = 64;
  config.head_dim = 16;
  config.intermediate_size = 128;
  auto model = models::make_model(config);
  models::init_parameters(*model, 3, 0.05);
  for (auto& p : model->parameters()) p.set_requires_grad(false);
  std::map<std::string, at::Tensor> weights;
  std::int64_t f32_bytes = 0;
  for (const auto& s : model->sites())
    if (Model::is_linear_point(s.point) && s.point != "head") {
      weights[s.name] = model->linear(s.name)->weight.detach().clone();
      f32_bytes += weights[s.name].numel() * 4;
    }
  for (const bool double_quant : {true, false}) {
    CAPTURE(double_quant);
    auto q = make_method("quantize", params({{"double_quant", double_quant ? "true" : "false"}}));
    q->attach(*model);
    std::int64_t held = 0;  // measured: what the sites hold now
    for (const auto& [name, w] : weights) {
      auto* lin = model->linear(name);
      held += lin->weight.numel() * lin->weight.element_size();
      for (const auto& b : model->hooks(name).weight_transforms.at(0)->buffers())
        held += b.numel() * b.element_size();
      auto deq = lin->effective_weight();
      // NF4's largest gap between levels is 0.30 of a block's absmax: error at most half of it.
      auto bound = w.abs().max().item<double>() * 0.16;
      CHECK((deq - w).abs().max().item<double>() <= bound);
    }
    const double ratio = static_cast<double>(held) / f32_bytes;
    CHECK(ratio <= 0.3);
    CHECK(ratio <= (double_quant ? 0.135 : 0.145));
    CHECK_MESSAGE(q->report().find("x)") != std::string::npos, q->report());
    MESSAGE(q->report());
    q->detach(*model);
    for (const auto& [name, w] : weights) CHECK(model->linear(name)->weight.sizes() == w.sizes());
  }
}

TEST_CASE("QLoRA computes the same whichever of quantize and lora is listed first") {
  // A linear site applies its weight transforms (NF4) to the base weight and then adds the
  // deltas, whatever order the methods attached in: the recipe order is not a trap (recipes.md).
  load_test_plugins();
  const auto config = qlora_config();
  auto make = [&] {
    auto model = frozen_model(config);
    model->eval();
    return model;
  };
  const auto lora_params = params({{"r", "4"}, {"targets", "[all-linear]"}});
  auto first = make(), second = make();
  auto q1 = make_method("quantize", params({}));
  auto l1 = make_method("lora", lora_params);
  q1->attach(*first);
  l1->attach(*first);
  nudge(*l1);  // B is zero at first: give the delta something to add
  auto l2 = make_method("lora", lora_params);
  auto q2 = make_method("quantize", params({}));
  l2->attach(*second);
  q2->attach(*second);
  l2->load_state(l1->state(), "l1");
  const auto ids = torch::randint(config.vocab_size, {2, 7}, torch::kLong);
  const auto a = logits(*first, ids), b = logits(*second, ids);
  CHECK(torch::equal(a, b));
  CHECK_FALSE(torch::equal(a, logits(*make(), ids)));  // and both differ from the plain base
}

TEST_CASE("QLoRA's backward dequantises the NF4 base again, with the held weights' gradients") {
  // A frozen quantised site keeps its input for the backward, not a dequantised F32 copy of its
  // weight; the gradients are those of the same model with the dequantised weights put back.
  load_test_plugins();
  const auto config = qlora_config();
  auto make = [&] { return frozen_model(config); };
  const auto lora_params = params({{"r", "4"}, {"targets", "[all-linear]"}});
  auto nf4 = make(), held = make();
  auto q1 = make_method("quantize", params({})), l1 = make_method("lora", lora_params);
  auto q2 = make_method("quantize", params({})), l2 = make_method("lora", lora_params);
  q1->attach(*nf4);
  l1->attach(*nf4);
  nudge(*l1);
  q2->attach(*held);
  l2->attach(*held);
  l2->load_state(l1->state(), "l1");
  q2->merge(*held);  // the dequantised weights back as plain frozen weights
  const auto ids = torch::randint(config.vocab_size, {2, 7}, torch::kLong);
  auto upstream = torch::randn({2, 7, config.vocab_size});
  auto grads = [&](Model& m, Method& lora) {
    auto out = m.forward({ids, {}, {}, {}}, nullptr).logits;
    (out * upstream).sum().backward();
    std::vector<at::Tensor> g;
    for (auto& [name, t] : lora.trainable_parameters()) g.push_back(t.grad());
    return std::pair{out, g};
  };
  auto [out_nf4, g_nf4] = grads(*nf4, *l1);
  auto [out_held, g_held] = grads(*held, *l2);
  // The recomputing node is in the graph (a later layer's input needs its gradient).
  std::vector<torch::autograd::Node*> todo{out_nf4.grad_fn().get()};
  std::set<torch::autograd::Node*> seen;
  bool recomputes = false;
  while (!todo.empty()) {
    auto* n = todo.back();
    todo.pop_back();
    if (!n || !seen.insert(n).second) continue;
    recomputes |= n->name().find("RecomputedWeightLinear") != std::string::npos;
    for (const auto& e : n->next_edges()) todo.push_back(e.function.get());
  }
  CHECK(recomputes);
  const auto terms = 2 * graft::test::forward_terms(config, 7);
  GRAFT_CHECK_CLOSE(out_nf4, out_held, graft::test::reorder_tolerance(out_held, terms));
  REQUIRE(g_nf4.size() == g_held.size());
  for (std::size_t i = 0; i < g_nf4.size(); ++i)
    GRAFT_CHECK_CLOSE(g_nf4[i], g_held[i], graft::test::reorder_tolerance(g_held[i], terms));
}

TEST_CASE("the Fastfood projection is regenerated from its seed, never stored") {
  load_test_plugins();
  auto model = tiny_model("llama");
  auto a = make_method("intrinsic_said", params({{"dim", "32"}, {"seed", "7"}}));
  a->attach(*model);
  nudge(*a);
  const auto trained = logits(*model, torch::tensor({{1, 2, 3}}, torch::kLong));
  auto state = a->state();
  CHECK(state.size() == 1 + 14);  // theta_d and one lambda per matrix (7 per layer, 2 layers)
  a->detach(*model);
  auto same = make_method("intrinsic_said", params({{"dim", "32"}, {"seed", "7"}}));
  same->attach(*model);
  same->load_state(state, "state");
  CHECK(torch::equal(logits(*model, torch::tensor({{1, 2, 3}}, torch::kLong)), trained));
  same->detach(*model);
  auto other = make_method("intrinsic_said", params({{"dim", "32"}, {"seed", "8"}}));
  other->attach(*model);
  other->load_state(state, "state");
  CHECK(graft::test::max_diff(logits(*model, torch::tensor({{1, 2, 3}}, torch::kLong)), trained) >
        100 * graft::test::forward_tolerance(*model, trained, 3));
}

TEST_CASE("sparse gradient selection picks the entries with the largest gradients") {
  load_test_plugins();
  auto model = tiny_model("gpt2");
  auto m = make_method("sparse", params({{"selection", "gradient"},
                                         {"density", "0.02"},
                                         {"targets", "[attn.o]"},
                                         {"layers", "0"},
                                         {"calibration_batches", "1"}}));
  m->attach(*model);
  CHECK(m->needs_calibration());
  CHECK_THROWS_WITH_AS(m->trainable_parameters(), doctest::Contains("calibrate()"), ParamError);
  auto ids = torch::tensor({{3, 7, 1, 9, 4}}, torch::kLong);
  auto loss = [&] {
    auto out = model->forward({ids, {}, {}, {}}, nullptr).logits;
    return torch::cross_entropy_loss(out.slice(1, 0, -1).reshape({-1, out.size(-1)}),
                                     ids.slice(1, 1).reshape({-1}));
  };
  m->calibrate(*model, loss);
  CHECK_FALSE(m->needs_calibration());
  // The same gradient, computed here.
  auto* lin = model->linear("layers.0.attn.o");
  lin->weight.set_requires_grad(true);
  loss().backward();
  auto expected = std::get<1>(lin->weight.grad().abs().reshape({-1}).topk(
      m->state().at("layers.0.attn.o.indices").size(0)));
  lin->weight.set_requires_grad(false);
  CHECK(torch::equal(std::get<0>(expected.sort()), m->state().at("layers.0.attn.o.indices")));
}

TEST_CASE("methods refuse what they cannot do, in one line naming the site and the reason") {
  load_test_plugins();
  auto llama = tiny_model("llama");
  CHECK_THROWS_WITH_AS(
      make_method("compacter", params({{"reduction_factor", "3"}}))->attach(*llama),
      doctest::Contains("site 'layers.0.attn.out': its width 16 and bottleneck "
                        "width 5 (16 / reduction_factor) must both be divisible by n = 4"),
      Error);
  CHECK_THROWS_WITH_AS(make_method("bitfit", params({}))->attach(*llama),
                       doctest::Contains("set add_missing: true"), ParamError);
  CHECK_THROWS_WITH_AS(
      make_method("prompt_tuning", params({{"init", "text"}, {"init_text", "hi"}}))->attach(*llama),
      doctest::Contains("this model has none"), ParamError);
  CHECK_THROWS_WITH_AS(make_method("prompt_tuning", params({{"init", "text"}})),
                       doctest::Contains("needs init_text"), ParamError);
  CHECK_THROWS_WITH_AS(make_method("krona", params({{"a_shape", "[3, 4]"}}))->attach(*llama),
                       doctest::Contains("A's shape must divide it"), ParamError);
  CHECK_THROWS_WITH_AS(make_method("pfeiffer", params({{"targets", "[attn.q]"}}))->attach(*llama),
                       doctest::Contains("is not a sublayer output"), Error);
  CHECK_THROWS_WITH_AS(make_method("prefix_tuning", params({{"layers", "0"}})),
                       doctest::Contains("do not apply"), ParamError);
  CHECK_THROWS_WITH_AS(make_method("intrinsic_said", params({{"dim", "100000"}}))->attach(*llama),
                       doctest::Contains("larger than the 3840 weights"), ParamError);
  CHECK_THROWS_WITH_AS(make_method("layer_select", params({{"top", "5"}}))->attach(*llama),
                       doctest::Contains("has 2 layers, not 5"), ParamError);
  // Merging lora into a quantised base needs the quantised weights back first.
  auto q = make_method("quantize", params({}));
  q->attach(*llama);
  auto lora = make_method("lora", params({}));
  lora->attach(*llama);
  CHECK_THROWS_WITH_AS(lora->merge(*llama), doctest::Contains("merge that method first"), Error);
}

TEST_CASE("bitfit trains norm biases in place where the family has them") {
  load_test_plugins();
  auto gpt2 = tiny_model("gpt2");
  auto m = make_method("bitfit", params({{"targets", "[norm.attn, attn.q]"}}));
  m->attach(*gpt2);
  std::int64_t n = 0;
  for (const auto& [name, t] : m->trainable_parameters()) n += t.numel();
  const auto d = gpt2->config().hidden_size;
  CHECK(n == 2 * (d + d));  // per layer: the attention norm's bias and q's bias
}

TEST_CASE("the trainable counts the plugin READMEs give for stories260K") {
  GRAFT_MODEL_OR_SKIP(path, "stories260K");
  load_test_plugins();
  auto loaded = load_model(path.string());
  const std::vector<std::tuple<std::string, Params, std::int64_t>> examples = {
      {"lora", params({}), 8960},
      {"bitfit", params({{"add_missing", "true"}}), 3000},
      {"ia3", params({}), 1180},
      {"pfeiffer", params({}), 2900},
      {"parallel", params({}), 20960},
      {"compacter++", params({{"reduction_factor", "16"}}), 1084},
      {"prompt_tuning", params({}), 640},
      {"prefix_tuning", params({}), 199360},
      {"krona", params({}), 1120},
      {"loha", params({}), 17920},
      {"intrinsic_said", params({}), 1035},
      {"sparse", params({}), 1125},
      {"quantize", params({}), 0},
  };
  for (const auto& [name, settings, expected] : examples) {
    CAPTURE(name);
    auto m = make_method(name, settings);
    m->attach(*loaded.model);
    std::int64_t n = 0;
    for (const auto& [key, t] : m->trainable_parameters()) n += t.numel();
    CHECK(n == expected);
    m->detach(*loaded.model);
  }
}

TEST_CASE("an adapter names the plugins it needs: a missing one, or another major version") {
  load_test_plugins();
  auto model = tiny_model("llama", 3);
  auto lora = make_method("lora", params({{"r", "2"}}));
  lora->attach(*model);
  TempDir dir;
  save_adapter(dir.path(), *model, {lora.get()});
  lora->detach(*model);
  const auto cfg_path = dir.path() / "adapter_config.json";
  auto cfg = nlohmann::json::parse(io::read_text_file(cfg_path));
  std::string lora_version;
  for (const auto& r : load_plugins())
    for (const auto& m : r.methods)
      if (m == "lora") lora_version = r.version;
  CHECK(cfg["methods"][0]["plugin"] == nlohmann::json{{"name", "lora"}, {"version", lora_version}});
  auto rewrite = [&](const std::string& name, const std::string& version) {
    auto c = cfg;
    c["methods"][0]["name"] = name;
    c["methods"][0]["plugin"] = {{"name", name}, {"version", version}};
    std::ofstream(cfg_path) << c.dump();
  };
  rewrite("lora_ext", "1.2.0");
  CHECK_THROWS_WITH_AS(
      load_adapter(dir.path(), *model),
      doctest::Contains("methods[0]: method \"lora_ext\" needs the plugin lora_ext "
                        "1.2.0, which is not among the loaded plugins"),
      FileError);
  const auto major = std::to_string(std::stoi(lora_version) + 1);
  rewrite("lora", major + ".0.0");
  const auto other =
      "was saved by plugin lora " + major + ".0.0, but the loaded plugin lora is " + lora_version;
  CHECK_THROWS_WITH_AS(load_adapter(dir.path(), *model), doctest::Contains(other.c_str()),
                       FileError);
  rewrite("lora", lora_version);
  CHECK(load_adapter(dir.path(), *model).size() == 1);
}

TEST_CASE("a peft adapter must hold exactly the modules its target_modules names") {
  load_test_plugins();
  auto model = tiny_model("llama", 4);
  auto ia3 = make_method("ia3", params({}));
  ia3->attach(*model);
  TempDir dir;
  save_adapter_as("peft", dir.path(), *model, {ia3.get()});
  ia3->detach(*model);
  const auto cfg = nlohmann::json::parse(io::read_text_file(dir / "adapter_config.json"));
  auto tensors = io::read_safetensors(dir / "adapter_model.safetensors").tensors;
  CHECK(load_adapter(dir.path(), *model).size() == 1);
  // One vector gone: peft would leave that module unscaled; graft refuses the damaged file.
  const std::string gone = "base_model.model.model.layers.1.self_attn.k_proj.ia3_l";
  REQUIRE(tensors.count(gone));
  auto fewer = tensors;
  fewer.erase(gone);
  TempDir damaged;
  peft::write_adapter(damaged.path(), cfg, fewer);
  auto fresh = tiny_model("llama", 4);
  CHECK_THROWS_WITH_AS(load_adapter(damaged.path(), *fresh),
                       doctest::Contains(("lacks '" + gone + "'").c_str()), FileError);
  // A module that target_modules does not name.
  auto narrower = cfg;
  narrower["target_modules"] = {"v_proj", "down_proj"};
  narrower["feedforward_modules"] = {"down_proj"};
  TempDir extra;
  peft::write_adapter(extra.path(), narrower, tensors);
  CHECK_THROWS_WITH_AS(load_adapter(extra.path(), *fresh),
                       doctest::Contains("but target_modules [\"v_proj\",\"down_proj\"] does not "
                                         "name module model.layers.0.self_attn.k_proj"),
                       FileError);
}
