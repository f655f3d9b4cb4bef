// Merged models written as Hugging Face folders and GGUF files load again with the outputs of the
// unmerged adapter; LoRA adapters written for llama.cpp hold exactly the merged update.
#include <graft/adapter.h>
#include <graft/io/gguf.h>
#include <graft/load.h>
#include <graft/plugin.h>
#include <torch/torch.h>

#include "method_params.h"
#include "models/families.h"
#include "numeric.h"
#include "support.h"
#include "tiny_models.h"

using namespace graft;
using graft::test::TempDir;
using graft::test::tiny_model;

namespace {

at::Tensor out_of(Model& m) {
  return graft::test::model_outputs(
      m, torch::tensor({{3, 7, 1, 9, 4}, {2, 2, 5, 6, 8}}, torch::kLong));
}

// A tiny llama model with the given RoPE pairing, frozen.
std::shared_ptr<Model> llama_with(RopeStyle style, std::uint64_t seed) {
  auto config = graft::test::tiny_config("llama");
  config.rope_style = style;
  config.architecture = "LlamaForCausalLM";
  auto model = make_model(config);
  init_random(*model, seed, 0.3);
  model->eval();
  for (auto& p : model->parameters()) p.set_requires_grad(false);
  model->set_tokenizer(graft::test::toy_tokenizer(config.vocab_size));
  return model;
}

std::unique_ptr<Method> random_lora(Model& m, const std::string& targets) {
  auto p = Params::map("m");
  auto list = Params::list("m.targets");
  list.add(Params::scalar(targets));
  p.set("targets", list);
  p.set("r", Params::scalar("2"));
  p.set("alpha", Params::scalar("3"));
  auto lora = make_method("lora", p);
  lora->attach(m);
  torch::NoGradGuard ng;
  for (auto& [name, t] : lora->trainable_parameters()) t.add_(torch::randn_like(t) * 0.3);
  return lora;
}

}  // namespace

TEST_CASE("merged models round-trip through Hugging Face folders and GGUF files") {
  load_plugins();
  for (const std::string family : {"llama", "gpt2", "bert"}) {
    CAPTURE(family);
    TempDir dir;
    auto base = tiny_model(family, 7);
    // The base model itself saves and loads unchanged.
    save_hf_model(*base, dir / "base");
    auto reloaded = load_model((dir / "base").string());
    CHECK(torch::equal(out_of(*reloaded.model), out_of(*base)));

    auto lora = random_lora(*base, "all-linear");
    const auto with_adapter = out_of(*base);
    lora->merge(*base);
    save_hf_model(*base, dir / "merged");
    auto merged = load_model((dir / "merged").string());
    GRAFT_CHECK_CLOSE(out_of(*merged.model), with_adapter,
                      graft::test::forward_tolerance(*base, with_adapter, 5));
    CHECK_THROWS_WITH_AS(save_hf_model(*base, dir / "merged"), doctest::Contains("already exists"),
                         FileError);
  }
  for (const auto style : {RopeStyle::interleaved, RopeStyle::half_split}) {
    CAPTURE(static_cast<int>(style));
    TempDir dir;
    auto model = llama_with(style, 8);
    auto lora = random_lora(*model, "all-linear");
    const auto with_adapter = out_of(*model);
    lora->merge(*model);
    save_gguf_model(*model, dir / "m.gguf");
    auto gguf = load_model((dir / "m.gguf").string());
    CHECK(gguf.model->config().rope_style == RopeStyle::half_split);  // as graft runs every file
    const auto tolerance = graft::test::forward_tolerance(*model, with_adapter, 5);
    GRAFT_CHECK_CLOSE(out_of(*gguf.model), with_adapter, tolerance);
    // And from the GGUF model to a Hugging Face folder (q/k rows back to half-split order).
    save_hf_model(*gguf.model, dir / "hf");
    auto hf = load_model((dir / "hf").string());
    GRAFT_CHECK_CLOSE(out_of(*hf.model), with_adapter, tolerance);
  }
}

TEST_CASE("LoRA written for llama.cpp holds W + alpha/r B A in llama.cpp's tensor order") {
  load_plugins();
  for (const auto style : {RopeStyle::interleaved, RopeStyle::half_split}) {
    CAPTURE(static_cast<int>(style));
    TempDir dir;
    auto model = llama_with(style, 9);
    const auto& config = model->config();
    auto p = Params::map("m");
    auto list = Params::list("m.targets");
    list.add(Params::scalar("attn.q"));
    list.add(Params::scalar("attn.k"));
    list.add(Params::scalar("ffn.down"));
    p.set("targets", list);
    p.set("r", Params::scalar("2"));
    p.set("alpha", Params::scalar("3"));
    p.set("rslora", Params::scalar("true"));
    auto rank = Params::map("m.rank_pattern");
    rank.set("ffn.down", Params::scalar("4"));
    p.set("rank_pattern", rank);
    auto lora = make_method("lora", p);
    lora->attach(*model);
    {
      torch::NoGradGuard ng;
      for (auto& [name, t] : lora->trainable_parameters()) t.add_(torch::randn_like(t) * 0.3);
    }
    auto base = models::to_gguf(model->config(), [&] {
      io::TensorMap t;
      for (const auto& q : model->named_parameters()) t[q.key()] = q.value().detach().clone();
      return t;
    }());
    save_adapter_as("gguf", dir / "lora.gguf", *model, {lora.get()});
    lora->merge(*model);
    io::TensorMap merged_params;
    for (const auto& q : model->named_parameters()) merged_params[q.key()] = q.value().detach();
    auto merged = models::to_gguf(model->config(), merged_params);

    io::GgufFile f(dir / "lora.gguf");
    CHECK(f.at("general.type").as_string("") == "adapter");
    CHECK(f.at("adapter.type").as_string("") == "lora");
    const double alpha = f.at("adapter.lora.alpha").as_double("");
    int pairs = 0;
    for (const auto& info : f.tensors()) {
      if (info.name.size() < 7 || info.name.substr(info.name.size() - 7) != ".lora_a") continue;
      const auto target = info.name.substr(0, info.name.size() - 7);
      auto a = f.load(info), b = f.load(target + ".lora_b");
      const auto scale = alpha / a.size(0);
      auto expected = base.at(target) + torch::matmul(b, a) * scale;
      // r-term products, scaled and added in another order: elementwise bound.
      const auto bound = 2 * graft::test::gamma32(a.size(0) + 3) *
                         (base.at(target).abs() + torch::matmul(b.abs(), a.abs()) * scale);
      CHECK_MESSAGE(((expected - merged.at(target)).abs() <= bound).all().item<bool>(), target);
      ++pairs;
    }
    CHECK(pairs == 3 * config.num_layers);
  }
}

TEST_CASE("every mergeable method's merged model saves and loads with its outputs") {
  graft::test::load_test_plugins();
  using graft::test::params;
  const std::vector<std::pair<std::string, Params>> methods = {
      {"bitfit", params({{"add_missing", "true"}})},
      {"ia3", params({})},
      {"krona", params({{"targets", "[all-linear]"}})},
      {"intrinsic_said", params({{"dim", "40"}})},
      {"sparse", params({{"density", "0.1"}})},
      {"lora", params({{"dora", "true"}, {"targets", "[attn.q, ffn.down]"}})},
  };
  for (const auto& [name, settings] : methods) {
    for (const std::string family : {"llama", "gpt2", "bert"}) {
      CAPTURE(name);
      CAPTURE(family);
      TempDir dir;
      auto model = tiny_model(family, 7);
      auto m = make_method(name, settings);
      m->attach(*model);
      {
        torch::NoGradGuard ng;
        for (auto& [key, t] : m->trainable_parameters()) t.add_(torch::randn_like(t) * 0.2);
      }
      const auto with_adapter = out_of(*model);
      m->merge(*model);
      if (name == "bitfit" && family == "llama") {  // Llama checkpoints hold no o/ffn biases
        CHECK_THROWS_WITH_AS(save_hf_model(*model, dir / "merged"),
                             doctest::Contains("tensor 'layers.0.attn.o.bias' has no place"),
                             Error);
        CHECK_FALSE(std::filesystem::exists(dir / "merged"));
        continue;
      }
      save_hf_model(*model, dir / "merged");
      auto merged = load_model((dir / "merged").string());
      GRAFT_CHECK_CLOSE(out_of(*merged.model), with_adapter,
                        graft::test::forward_tolerance(*model, with_adapter, 5));
    }
  }
}

TEST_CASE("merging into a head tied to the embedding unties it, in both output formats") {
  load_plugins();
  for (const std::string family : {"llama", "gpt2"}) {
    CAPTURE(family);
    TempDir dir;
    auto config = graft::test::tiny_config(family);
    config.tie_embeddings = true;
    auto model = make_model(config);
    init_random(*model, 12, 0.3);
    model->eval();
    for (auto& p : model->parameters()) p.set_requires_grad(false);
    model->set_tokenizer(graft::test::toy_tokenizer(config.vocab_size));
    const auto embedding = model->named_parameters()["embed.weight"].clone();
    auto lora = random_lora(*model, "head");
    const auto with_adapter = out_of(*model);
    const auto tolerance = graft::test::forward_tolerance(*model, with_adapter, 5);
    lora->merge(*model);
    // The head has its own weight now; the embedding (and so the inputs) did not move.
    CHECK_FALSE(model->config().tie_embeddings);
    CHECK(torch::equal(model->named_parameters()["embed.weight"], embedding));
    GRAFT_CHECK_CLOSE(out_of(*model), with_adapter, tolerance);
    save_hf_model(*model, dir / "hf");
    auto hf = load_model((dir / "hf").string());
    CHECK_FALSE(hf.model->config().tie_embeddings);
    GRAFT_CHECK_CLOSE(out_of(*hf.model), with_adapter, tolerance);
    if (family == "llama") {
      save_gguf_model(*model, dir / "m.gguf");
      auto gguf = load_model((dir / "m.gguf").string());
      CHECK_FALSE(gguf.model->config().tie_embeddings);
      GRAFT_CHECK_CLOSE(out_of(*gguf.model), with_adapter, tolerance);
    }
    // Unmerged, the head shares the embedding again.
    lora->unmerge(*model);
    CHECK(model->config().tie_embeddings);
    CHECK(model->linear("head")->tied());
    GRAFT_CHECK_CLOSE(out_of(*model), with_adapter, tolerance);
  }
}

TEST_CASE("a GGUF model carries its tokenizer, or is not written") {
  TempDir dir;
  auto model = llama_with(RopeStyle::half_split, 13);
  save_gguf_model(*model, dir / "m.gguf");
  auto back = load_model((dir / "m.gguf").string());
  REQUIRE(back.tokenizer);
  CHECK(back.tokenizer->vocab_size() == model->config().vocab_size);
  CHECK(back.tokenizer->token(5) == "p5");
  CHECK(back.tokenizer->bos_id() == 1);
  // Without one, nothing is written: llama.cpp loads no model without its tokenizer.
  model->set_tokenizer(nullptr);
  CHECK_THROWS_WITH_AS(save_gguf_model(*model, dir / "n.gguf"),
                       doctest::Contains("carries no tokenizer"), FileError);
  CHECK_FALSE(std::filesystem::exists(dir / "n.gguf"));
  // A tokenizer with fewer tokens than embedding rows is padded with unused tokens.
  model->set_tokenizer(graft::test::toy_tokenizer(model->config().vocab_size - 4));
  save_gguf_model(*model, dir / "p.gguf");
  io::GgufFile padded(dir / "p.gguf");
  const auto tokens = padded.at("tokenizer.ggml.tokens").as_strings("");
  REQUIRE(static_cast<std::int64_t>(tokens.size()) == model->config().vocab_size);
  CHECK(tokens.back() == "[PAD" + std::to_string(model->config().vocab_size - 1) + "]");
  CHECK(padded.at("tokenizer.ggml.token_type").as_ints("").back() == 5);
}

TEST_CASE("a merged model written with Q8_0 matrices loads within Q8_0's rounding of the merge") {
  load_plugins();
  auto config = graft::test::tiny_config("llama");
  config.hidden_size = 32;  // rows of 32: quantised; ffn_down's rows of 24 are not
  config.head_dim = 8;
  config.architecture = "LlamaForCausalLM";
  auto model = make_model(config);
  init_random(*model, 4, 0.3);
  model->eval();
  for (auto& p : model->parameters()) p.set_requires_grad(false);
  model->set_tokenizer(graft::test::toy_tokenizer(config.vocab_size));
  auto lora = random_lora(*model, "all-linear");
  lora->merge(*model);
  TempDir dir;
  save_gguf_model(*model, dir / "q.gguf", {}, c10::ScalarType::Undefined, true);
  io::GgufFile file(dir / "q.gguf");
  CHECK(file.at("general.file_type").i == 7);
  for (const auto& t : file.tensors()) {
    CAPTURE(t.name);
    const bool matrix = t.shape.size() == 2 && t.shape.back() % 32 == 0;
    CHECK(t.type == (matrix ? 8u : 0u));
  }
  CHECK(file.find_tensor("blk.0.ffn_down.weight")->type == 0);
  CHECK(file.find_tensor("blk.0.attn_q.weight")->type == 8);

  // Each weight within half a Q8_0 step of its block (d = max|block| / 127, stored as f16) of
  // the merged weight; what was not quantised is exact.
  auto loaded = load_model((dir / "q.gguf").string());
  const auto want = model->named_parameters(true);
  for (const auto& p : loaded.model->named_parameters(true)) {
    CAPTURE(p.key());
    const auto& w = want[p.key()];
    if (w.dim() != 2 || w.size(-1) % 32) {
      CHECK(torch::equal(p.value(), w));
      continue;
    }
    const auto blocks = w.reshape({-1, 32});
    const auto d = std::get<0>(blocks.abs().max(1, true)) / 127;
    const auto bound = d / 2 + 127 * d * std::ldexp(1.0, -11) + 1e-30;
    CHECK(((p.value().reshape({-1, 32}) - blocks).abs() <= bound).all().item<bool>());
    CHECK_FALSE(torch::equal(p.value(), w));  // it was quantised
  }
}
