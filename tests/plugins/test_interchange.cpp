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
  const auto path = graft::test::shared_dir() / "models" / "stories260K";
  GRAFT_SKIP_UNLESS_EXISTS(path);
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
