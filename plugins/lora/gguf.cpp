// LoRA adapters as GGUF files in the form llama.cpp loads with --lora: general.type "adapter",
// adapter.type "lora", adapter.lora.alpha, and for each site a pair of tensors
//   blk.<L>.attn_q.weight.lora_a  [r, in]   blk.<L>.attn_q.weight.lora_b  [out, r]
// llama.cpp scales every pair by alpha / r (by 1 when alpha is 0 or absent); written, each
// site's own scaling (rank and alpha patterns, rsLoRA) is folded into its B so that the product
// is exact. q and k rows follow llama.cpp's order for the architecture (interleaved for llama
// and mistral, as its converter permutes the base weights), graft's the half-split one.
#include <graft/io/gguf.h>
#include <graft/plugin.h>
#include <torch/torch.h>

#include <map>

#include "../common/peft_shared.h"
#include "layer.h"
#include "lora.h"

namespace graft::plugins::lora {
namespace fs = std::filesystem;

namespace {

// graft's linear points as llama.cpp names their tensors.
const std::map<std::string, std::string>& gguf_names() {
  static const std::map<std::string, std::string> names = {
      {"attn.q", "attn_q"},      {"attn.k", "attn_k"},     {"attn.v", "attn_v"},
      {"attn.o", "attn_output"}, {"ffn.gate", "ffn_gate"}, {"ffn.up", "ffn_up"},
      {"ffn.down", "ffn_down"}};
  return names;
}

std::string gguf_tensor(const Site& site) {
  return site.point == "head"
             ? "output.weight"
             : "blk." + std::to_string(site.layer) + "." + gguf_names().at(site.point) + ".weight";
}

bool is_lora_adapter(const io::GgufFile& f) {
  auto* type = f.find("general.type");
  auto* kind = f.find("adapter.type");
  return type && type->type == io::GgufType::string && type->s == "adapter" && kind &&
         kind->type == io::GgufType::string && kind->s == "lora";
}

}  // namespace

bool detect_gguf_lora(const fs::path& file) {
  if (!fs::is_regular_file(file) || file.extension() != ".gguf") return false;
  try {
    return is_lora_adapter(io::GgufFile(file));
  } catch (const Error&) {
    return false;
  }
}

std::vector<std::unique_ptr<Method>> read_gguf_lora(const fs::path& file, Model& model) {
  const std::string where = file.string();
  io::GgufFile f(file);
  const auto& c = model.config();
  const auto arch = f.at("general.architecture").as_string("general.architecture");
  const std::string expected = gguf_rope_order(c) == RopeStyle::half_split ? "qwen2" : "llama";
  if (c.family != "llama" || (arch != expected && !(arch == "mistral" && expected == "llama")))
    throw FileError(where, "a llama.cpp LoRA for the " + arch +
                               " architecture, but this model is " + c.family + " (" +
                               c.architecture + ")");
  auto* alpha_value = f.find("adapter.lora.alpha");
  const double alpha = alpha_value ? alpha_value->as_double("adapter.lora.alpha") : 0.0;
  // Every tensor must be one half of a pair on a site graft has.
  std::map<std::string, const Site*> by_tensor;
  for (const auto& site : model.sites())
    if (Model::is_linear_point(site.point)) by_tensor[gguf_tensor(site)] = &site;
  peft_shared::Settings settings(where);
  std::vector<std::string> targets;
  auto ranks = settings.map("rank_pattern"), alphas = settings.map("alpha_pattern");
  io::TensorMap state;
  for (const auto& info : f.tensors()) {
    const std::string suffix = ".lora_a";
    if (info.name.size() > suffix.size() &&
        info.name.compare(info.name.size() - suffix.size(), suffix.size(), suffix) == 0) {
      const auto base = info.name.substr(0, info.name.size() - suffix.size());
      auto it = by_tensor.find(base);
      if (it == by_tensor.end())
        throw FileError(where, "LoRA on '" + base + "', which this model has no site for");
      if (!f.find_tensor(base + ".lora_b"))
        throw FileError(where, "'" + info.name + "' has no '" + base + ".lora_b'");
      const Site& site = *it->second;
      auto a = f.load(info);
      auto b = f.load(*f.find_tensor(base + ".lora_b"));
      const auto r = a.size(0);
      if (a.dim() != 2 || b.dim() != 2 || a.size(1) != site.in_features ||
          b.size(0) != site.out_features || b.size(1) != r)
        throw FileError(where, "'" + base + "': lora_a " + c10::str(a.sizes()) + " and lora_b " +
                                   c10::str(b.sizes()) + " do not fit site " + site.name);
      if (site.point == "attn.q" || site.point == "attn.k")
        b = permute_rope_rows(b, site.point == "attn.q" ? c.num_heads : c.num_kv_heads,
                              gguf_rope_order(c), c.rope_style);
      targets.push_back(site.name);
      ranks.set(site.name, settings.scalar(std::to_string(r), "tensors"));
      // llama.cpp: scale alpha / r, or 1 without an alpha.
      alphas.set(site.name,
                 settings.scalar(alpha > 0 ? alpha : static_cast<double>(r), "adapter.lora.alpha"));
      state[site.name + ".lora_A"] = a.to(torch::kFloat).contiguous();
      state[site.name + ".lora_B"] = b.to(torch::kFloat).contiguous();
    } else if (info.name.size() < 7 || info.name.compare(info.name.size() - 7, 7, ".lora_b") != 0) {
      throw FileError(where, "holds '" + info.name + "', which is not half of a LoRA pair");
    }
  }
  if (targets.empty()) throw FileError(where, "holds no LoRA pairs");
  if (state.size() != 2 * targets.size())
    throw FileError(where, "holds a .lora_b without its .lora_a");
  settings.set_list("targets", targets, "tensors");
  settings.set("rank_pattern", ranks);
  settings.set("alpha_pattern", alphas);
  auto method = std::make_unique<Lora>(LoraConfig::from_params(settings.params()));
  method->attach(model);
  method->load_state(state, where);
  std::vector<std::unique_ptr<Method>> methods;
  methods.push_back(std::move(method));
  return methods;
}

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
  if (c.classifier == "score")
    throw Error("gguf format: llama.cpp runs language models; this model is a sequence classifier");
  if (lora->settings().gating) throw Error("gguf format: llama.cpp has no gated (UniPELT) LoRA");
  const bool qwen2 = c.architecture.rfind("Qwen2", 0) == 0;
  const RopeStyle order = gguf_rope_order(c);
  const double alpha = lora->settings().alpha;
  io::TensorMap tensors;
  for (const auto& [site_name, hook] : lora->hooks()) {
    auto d = std::dynamic_pointer_cast<LoraDelta>(hook);
    if (!d)
      throw Error("gguf format: llama.cpp does not load DoRA adapters (site " + site_name + ")");
    const Site* site = model.find_site(site_name);
    if (site->point == "head" && c.tie_embeddings)
      throw Error(
          "gguf format: LoRA on the head of a model whose head is tied to the token "
          "embedding: the GGUF base has no output tensor to adapt, and llama.cpp refuses "
          "such an adapter (merge it instead: graft merge unties the head)");
    const std::string base = gguf_tensor(*site);
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
