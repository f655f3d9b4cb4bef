// Adapters and models move between graft, Hugging Face folders and GGUF files and mean the same
// thing everywhere: q/k rows of rotary models travel with the adapter, peft's files always hold
// transformers' order, and llama.cpp's files theirs.
#include <graft/adapter.h>
#include <graft/io/file.h>
#include <graft/io/gguf.h>
#include <graft/io/safetensors.h>
#include <graft/load.h>
#include <graft/plugin.h>
#include <torch/torch.h>

#include "method_params.h"
#include "numeric.h"
#include "support.h"
#include "tiny_models.h"

using namespace graft;
using graft::test::params;
using graft::test::TempDir;

namespace {

at::Tensor logits_of(Model& m) {
  torch::NoGradGuard ng;
  auto ids = torch::tensor({{1, 403, 6, 27, 380, 11}, {1, 87, 29, 0, 0, 0}}, torch::kLong);
  auto mask = torch::tensor({{1, 1, 1, 1, 1, 1}, {1, 1, 1, 0, 0, 0}}, torch::kLong);
  return m.forward({ids, mask, {}, {}}, nullptr).logits;
}

// LoRA on every attention projection (q and k rows are the ones RoPE pairs), with random B.
std::unique_ptr<Method> nudged_lora(Model& m) {
  auto lora = make_method("lora", params({{"r", "4"}, {"targets", "[attn.q, attn.k, attn.v]"}}));
  lora->attach(m);
  torch::NoGradGuard ng;
  torch::manual_seed(3);
  for (auto& [name, t] : lora->trainable_parameters()) t.add_(torch::randn_like(t) * 0.2);
  return lora;
}

}  // namespace

TEST_CASE("an adapter means the same on stories260K's GGUF file and on its Hugging Face export") {
  GRAFT_MODEL_OR_SKIP(path, "stories260K");
  graft::test::load_test_plugins();
  TempDir dir;
  auto gguf = load_model(path.string());
  save_hf_model(*gguf.model, dir / "hf");
  auto hf = load_model((dir / "hf").string());
  // The same base: llama.cpp's interleaved q/k rows are run in transformers' order.
  CHECK(torch::equal(logits_of(*gguf.model), logits_of(*hf.model)));

  SUBCASE("a graft adapter trained on the GGUF file, loaded on the folder, and back") {
    auto lora = nudged_lora(*gguf.model);
    const auto expected = logits_of(*gguf.model);
    save_adapter(dir / "adapter", *gguf.model, {lora.get()});
    auto saved = nlohmann::json::parse(io::read_text_file(dir / "adapter" / "adapter_config.json"));
    CHECK(saved["base_model"]["q_k_row_order"] == "half_split");
    auto on_hf = load_adapter(dir / "adapter", *hf.model);
    CHECK(torch::equal(logits_of(*hf.model), expected));
    for (auto& m : on_hf) m->detach(*hf.model);
    // And an adapter trained on the folder, on the GGUF file.
    lora->detach(*gguf.model);
    auto other = nudged_lora(*hf.model);
    const auto from_hf = logits_of(*hf.model);
    save_adapter(dir / "adapter2", *hf.model, {other.get()});
    auto on_gguf = load_adapter(dir / "adapter2", *gguf.model);
    CHECK(torch::equal(logits_of(*gguf.model), from_hf));
  }
  SUBCASE("peft export from the GGUF base holds transformers' order") {
    auto lora = nudged_lora(*gguf.model);
    const auto expected = logits_of(*gguf.model);
    save_adapter_as("peft", dir / "peft", *gguf.model, {lora.get()});
    auto on_hf = load_adapter(dir / "peft", *hf.model);
    CHECK(torch::equal(logits_of(*hf.model), expected));
    // The file's q rows are the folder's rows of the same LoRA: the B of q in the export equals
    // the B graft holds for the folder's model.
    const auto t = io::read_safetensors(dir / "peft" / "adapter_model.safetensors").tensors;
    const auto held = on_hf[0]->state();
    CHECK(torch::equal(t.at("base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"),
                       held.at("layers.0.attn.q.lora_B")));
  }
}

namespace {

// A tiny llama of an architecture llama.cpp keeps in the interleaved (llama) or half-split
// (qwen2) q/k order, with a vocabulary so that it can be written as GGUF.
std::shared_ptr<Model> tiny_llama(const std::string& architecture, std::uint64_t seed) {
  auto config = graft::test::tiny_config("llama");
  config.architecture = architecture;
  auto model = make_model(config);
  init_random(*model, seed, 0.3);
  model->eval();
  for (auto& p : model->parameters()) p.set_requires_grad(false);
  model->set_tokenizer(graft::test::toy_tokenizer(config.vocab_size));
  return model;
}

at::Tensor tiny_logits(Model& m) {
  return graft::test::model_outputs(m, torch::tensor({{3, 7, 1, 9, 4}}, torch::kLong));
}

}  // namespace

TEST_CASE("llama.cpp's GGUF LoRA adapters are read as they are written, in llama.cpp's order") {
  graft::test::load_test_plugins();
  for (const std::string arch : {"LlamaForCausalLM", "Qwen2ForCausalLM"}) {
    CAPTURE(arch);
    TempDir dir;
    auto model = tiny_llama(arch, 21);
    auto lora =
        make_method("lora", params({{"r", "2"}, {"alpha", "6"}, {"targets", "[all-linear]"}}));
    lora->attach(*model);
    {
      torch::NoGradGuard ng;
      for (auto& [name, t] : lora->trainable_parameters()) t.add_(torch::randn_like(t) * 0.3);
    }
    const auto expected = tiny_logits(*model);
    const auto tolerance = graft::test::forward_tolerance(*model, expected, 5);
    save_adapter_as("gguf", dir / "lora.gguf", *model, {lora.get()});
    lora->detach(*model);

    auto loaded = load_adapter(dir / "lora.gguf", *model);
    REQUIRE(loaded.size() == 1);
    CHECK(loaded[0]->name() == "lora");
    GRAFT_CHECK_CLOSE(tiny_logits(*model), expected, tolerance);

    // llama.cpp's --lora-scaled: half the scale is half the update.
    loaded[0]->set_scale(0.5);
    auto half = tiny_logits(*model);
    loaded[0]->set_scale(1.0);
    GRAFT_CHECK_CLOSE(tiny_logits(*model), expected, tolerance);
    for (auto& m : loaded) m->detach(*model);
    const auto base = tiny_logits(*model);
    CHECK(graft::test::max_diff(half, base) > 100 * tolerance);
    CHECK(graft::test::max_diff(half, expected) > 100 * tolerance);

    // Converted to peft, the same adapter on a fresh copy of the base.
    auto again = load_adapter(dir / "lora.gguf", *model);
    std::vector<Method*> methods;
    for (auto& m : again) methods.push_back(m.get());
    save_adapter_as("peft", dir / "peft", *model, methods);
    for (auto& m : again) m->detach(*model);
    auto fresh = tiny_llama(arch, 21);
    auto from_peft = load_adapter(dir / "peft", *fresh);
    GRAFT_CHECK_CLOSE(tiny_logits(*fresh), expected, tolerance);
  }
}

TEST_CASE("a LoRA file written as llama.cpp's converter writes it means the same in graft") {
  graft::test::load_test_plugins();
  TempDir dir;
  auto model = tiny_llama("LlamaForCausalLM", 22);
  const auto& c = model->config();
  // One pair on layer 0's q, B's rows in llama.cpp's interleaved order, no alpha (scale 1).
  torch::manual_seed(4);
  auto a = torch::randn({3, c.hidden_size}) * 0.3;
  auto b = torch::randn({c.num_heads * c.head_dim, 3}) * 0.3;
  io::write_gguf(
      dir / "hand.gguf",
      {{"general.architecture", io::gguf_string("llama")},
       {"general.type", io::gguf_string("adapter")},
       {"adapter.type", io::gguf_string("lora")}},
      {{"blk.0.attn_q.weight.lora_a", a},
       {"blk.0.attn_q.weight.lora_b",
        permute_rope_rows(b, c.num_heads, RopeStyle::half_split, RopeStyle::interleaved)}});
  auto loaded = load_adapter(dir / "hand.gguf", *model);
  const auto got = tiny_logits(*model);
  for (auto& m : loaded) m->detach(*model);
  // The same update in graft's own terms: alpha = r gives scale 1.
  auto lora = make_method(
      "lora", params({{"r", "3"}, {"alpha", "3"}, {"targets", "[attn.q]"}, {"layers", "0"}}));
  lora->attach(*model);
  lora->load_state({{"layers.0.attn.q.lora_A", a}, {"layers.0.attn.q.lora_B", b}}, "test");
  const auto want = tiny_logits(*model);
  GRAFT_CHECK_CLOSE(got, want, graft::test::forward_tolerance(*model, want, 5));

  // Broken files are refused in one line.
  io::write_gguf(dir / "odd.gguf",
                 {{"general.architecture", io::gguf_string("llama")},
                  {"general.type", io::gguf_string("adapter")},
                  {"adapter.type", io::gguf_string("lora")}},
                 {{"token_embd.weight.lora_a", a}, {"token_embd.weight.lora_b", b}});
  auto other = tiny_llama("LlamaForCausalLM", 22);
  CHECK_THROWS_WITH_AS(load_adapter(dir / "odd.gguf", *other),
                       doctest::Contains("LoRA on 'token_embd.weight'"), FileError);
}

TEST_CASE("a head LoRA for a model whose head is tied cannot be written for llama.cpp") {
  graft::test::load_test_plugins();
  TempDir dir;
  auto config = graft::test::tiny_config("llama");
  config.tie_embeddings = true;
  auto model = make_model(config);
  init_random(*model, 3, 0.3);
  auto lora = make_method("lora", params({{"targets", "[head]"}}));
  lora->attach(*model);
  CHECK_THROWS_WITH_AS(save_adapter_as("gguf", dir / "h.gguf", *model, {lora.get()}),
                       doctest::Contains("tied to the token embedding"), Error);
  CHECK_FALSE(std::filesystem::exists(dir / "h.gguf"));
}
