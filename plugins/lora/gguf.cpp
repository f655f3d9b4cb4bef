// LoRA adapters as GGUF files in the form llama.cpp loads with --lora: general.type "adapter",
// adapter.type "lora", adapter.lora.alpha, and for each site a pair of tensors
//   blk.<L>.attn_q.weight.lora_a  [r, in]   blk.<L>.attn_q.weight.lora_b  [out, r]
// llama.cpp scales every pair by alpha / r; each site's own scaling (rank and alpha patterns,
// rsLoRA) is folded into its B so that the product is exact. q and k rows follow llama.cpp's
// interleaved RoPE order, as its converter permutes the base weights.
#include <graft/io/gguf.h>
#include <graft/plugin.h>
#include <torch/torch.h>

#include <map>

#include "layer.h"
#include "lora.h"

namespace graft::plugins::lora {
namespace fs = std::filesystem;

void write_gguf_lora(const std::vector<Method*>& methods, const Model& model,
                     const fs::path& file) {
  auto* lora = dynamic_cast<Lora*>(methods.at(0));
  if (!lora) throw Error("gguf format: not a LoRA method");
  for (std::size_t i = 1; i < methods.size(); ++i)
    throw Error("gguf format: llama.cpp's LoRA adapters hold LoRA alone, not " +
                methods[i]->name());
  const auto& c = model.config();
  if (c.family != "llama")
    throw Error(
        "gguf format: llama.cpp LoRA adapters are written for llama-family models; this is " +
        c.family);
  const bool qwen2 = c.architecture.rfind("Qwen2", 0) == 0;
  const RopeStyle order = gguf_rope_order(c);
  static const std::map<std::string, std::string> names = {
      {"attn.q", "attn_q"},      {"attn.k", "attn_k"},     {"attn.v", "attn_v"},
      {"attn.o", "attn_output"}, {"ffn.gate", "ffn_gate"}, {"ffn.up", "ffn_up"},
      {"ffn.down", "ffn_down"}};
  const double alpha = lora->settings().alpha;
  io::TensorMap tensors;
  for (const auto& [site_name, hook] : lora->hooks()) {
    auto d = std::dynamic_pointer_cast<LoraDelta>(hook);
    if (!d)
      throw Error("gguf format: llama.cpp does not load DoRA adapters (site " + site_name + ")");
    const Site* site = model.find_site(site_name);
    const std::string base = site->point == "head" ? "output.weight"
                                                   : "blk." + std::to_string(site->layer) + "." +
                                                         names.at(site->point) + ".weight";
    const auto r = d->A.size(0);
    auto b = d->B.detach() * (d->scaling * r / alpha);
    if (site->point == "attn.q" || site->point == "attn.k")
      b = permute_rope_rows(b, site->point == "attn.q" ? c.num_heads : c.num_kv_heads, c.rope_style,
                            order);
    tensors[base + ".lora_a"] = d->A.detach().contiguous();
    tensors[base + ".lora_b"] = b.contiguous();
  }
  std::vector<std::pair<std::string, io::GgufValue>> meta = {
      {"general.architecture", io::gguf_string(qwen2 ? "qwen2" : "llama")},
      {"general.type", io::gguf_string("adapter")},
      {"general.name", io::gguf_string("graft lora")},
      {"adapter.type", io::gguf_string("lora")},
      {"adapter.lora.alpha", io::gguf_float(alpha)},
  };
  io::write_gguf(file, meta, tensors);
}

}  // namespace graft::plugins::lora
