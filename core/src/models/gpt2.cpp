// The gpt2 family: learned positions, pre-norm LayerNorm, fused q/k/v stored as Conv1D ([in, out])
// weights, which are transposed and split into the attn.q, attn.k and attn.v sites on load.
#include <graft/error.h>

#include "models/common.h"
#include "models/families.h"

namespace graft::models {
namespace {

class Gpt2LayerImpl : public torch::nn::Module {
 public:
  explicit Gpt2LayerImpl(const ModelConfig& c) : c_(c) {
    attn_norm = register_module("attn_norm", Norm(c.hidden_size, c.norm_eps, true));
    attn = register_module("attn", Attention(c, true, true));
    ffn_norm = register_module("ffn_norm", Norm(c.hidden_size, c.norm_eps, true));
    ffn = register_module("ffn", Ffn(c, false, true));
  }
  at::Tensor forward(at::Tensor x, const at::Tensor& key_mask, KVCache* cache, std::int64_t layer) {
    auto h = tap(taps.attn_in, attn_norm(x), x);
    auto q = split_heads(attn->q(h), c_.num_heads, c_.head_dim);
    auto k = split_heads(attn->k(h), c_.num_heads, c_.head_dim);
    auto v = split_heads(attn->v(h), c_.num_heads, c_.head_dim);
    auto kv = layer_keys(taps.attn_kv, h, k, v, key_mask, cache, layer);
    x = residual_step(taps.attn_out,
                      tap(taps.attn_out, attn->o(attend(q, kv.keys, kv.values, kv.mask, true)), h),
                      x);
    h = tap(taps.ffn_in, ffn_norm(x), x);
    auto act = tap(taps.ffn_act, activate(ffn->up(h), c_.hidden_act), h);
    return residual_step(taps.ffn_out, tap(taps.ffn_out, ffn->down(act), h), x);
  }
  LayerTaps taps;
  Norm attn_norm{nullptr}, ffn_norm{nullptr};
  Attention attn{nullptr};
  Ffn ffn{nullptr};

 private:
  ModelConfig c_;
};
TORCH_MODULE(Gpt2Layer);

class Gpt2 : public Model {
 public:
  explicit Gpt2(ModelConfig c) : Model(std::move(c)) {
    const auto& cfg = config_;
    embed = register_module("embed", torch::nn::Embedding(cfg.vocab_size, cfg.hidden_size));
    pos_embed =
        register_module("pos_embed", torch::nn::Embedding(cfg.max_positions, cfg.hidden_size));
    layers = register_module("layers", torch::nn::ModuleList());
    for (std::int64_t i = 0; i < cfg.num_layers; ++i) layers->push_back(Gpt2Layer(cfg));
    norm = register_module("norm", Norm(cfg.hidden_size, cfg.norm_eps, true));
    const bool classifier = cfg.classifier == "score";
    const auto head_width = classifier ? cfg.num_labels : cfg.vocab_size;
    head = register_module("head", Linear(cfg.hidden_size, head_width, false));
    if (cfg.tie_embeddings && !classifier) head->tie_weight(embed->weight);

    embed_site_ = add_site({"embed", "embed", -1, cfg.vocab_size, cfg.hidden_size});
    for (std::int64_t i = 0; i < cfg.num_layers; ++i)
      for (auto& s : layer_sites(cfg, i, false, true)) add_site(std::move(s));
    add_site({"norm", "norm.final", -1, cfg.hidden_size, cfg.hidden_size});
    add_site({"head", "head", -1, cfg.hidden_size, head_width});
    for (std::int64_t i = 0; i < cfg.num_layers; ++i)
      layers->ptr<Gpt2LayerImpl>(i)->taps =
          layer_taps([this](const std::string& n) { return site_hooks(n); }, i);
    connect_sites();
  }

  bool causal() const override { return true; }

  ForwardOutput forward(const ForwardInput& in, KVCache* cache) override {
    auto [x, key_mask, positions, prompt] =
        decoder_inputs(embed(in.input_ids), in, embed_site_, cache, prefix_length());
    TORCH_CHECK(positions.max().item<std::int64_t>() < config_.max_positions, "gpt2: position ",
                positions.max().item<std::int64_t>(), " is beyond the model's ",
                config_.max_positions, " learned positions");
    x = x + pos_embed(positions);
    for (std::size_t i = 0; i < layers->size(); ++i)
      x = layers->ptr<Gpt2LayerImpl>(i)->forward(x, key_mask, cache, i);
    if (cache) cache->mask = key_mask;
    return decoder_outputs(norm(x), in, prompt, config_, *head);
  }

  torch::nn::Embedding embed{nullptr}, pos_embed{nullptr};
  torch::nn::ModuleList layers{nullptr};
  Norm norm{nullptr};
  Linear head{nullptr};

 private:
  SiteHooks* embed_site_ = nullptr;
};

const std::vector<NameRule> kHfRules = {
    {"embed.weight", "wte.weight"},
    {"pos_embed.weight", "wpe.weight"},
    {"norm.weight", "ln_f.weight"},
    {"norm.bias", "ln_f.bias"},
    {"layers.{L}.attn_norm.weight", "h.{L}.ln_1.weight"},
    {"layers.{L}.attn_norm.bias", "h.{L}.ln_1.bias"},
    {"layers.{L}.attn.qkv.weight", "h.{L}.attn.c_attn.weight"},
    {"layers.{L}.attn.qkv.bias", "h.{L}.attn.c_attn.bias"},
    {"layers.{L}.attn.o.weight", "h.{L}.attn.c_proj.weight"},
    {"layers.{L}.attn.o.bias", "h.{L}.attn.c_proj.bias"},
    {"layers.{L}.ffn_norm.weight", "h.{L}.ln_2.weight"},
    {"layers.{L}.ffn_norm.bias", "h.{L}.ln_2.bias"},
    {"layers.{L}.ffn.up.weight", "h.{L}.mlp.c_fc.weight"},
    {"layers.{L}.ffn.up.bias", "h.{L}.mlp.c_fc.bias"},
    {"layers.{L}.ffn.down.weight", "h.{L}.mlp.c_proj.weight"},
    {"layers.{L}.ffn.down.bias", "h.{L}.mlp.c_proj.bias"},
    {"head.weight", "lm_head.weight"},
    {"head.weight", "score.weight"},
};

bool ends_with(const std::string& s, const std::string& suffix) {
  return s.size() >= suffix.size() &&
         s.compare(s.size() - suffix.size(), suffix.size(), suffix) == 0;
}

}  // namespace

std::shared_ptr<Model> make_gpt2(const ModelConfig& config) {
  return std::make_shared<Gpt2>(config);
}

ModelConfig gpt2_config_from_hf(const nlohmann::json& j, const std::string& source) {
  JsonConfig c(j, source);
  ModelConfig m;
  m.family = "gpt2";
  m.architecture = architecture_of(j, "GPT2LMHeadModel");
  if (m.architecture == "GPT2ForSequenceClassification") {
    m.classifier = "score";
    m.num_labels = num_labels_of(j, source);
  } else if (m.architecture != "GPT2LMHeadModel" && m.architecture != "GPT2Model") {
    throw FileError(source, "architecture \"" + m.architecture +
                                "\" is not supported (graft runs GPT2LMHeadModel and "
                                "GPT2ForSequenceClassification)");
  }
  m.vocab_size = c.size("vocab_size");
  m.hidden_size = c.size("n_embd");
  m.num_layers = c.size("n_layer");
  m.num_heads = m.num_kv_heads = c.size("n_head");
  m.head_dim = m.hidden_size / m.num_heads;
  m.intermediate_size = c.size("n_inner", 4 * m.hidden_size);
  m.max_positions = c.size("n_positions", 1024);
  m.norm_eps = c.number("layer_norm_epsilon", 1e-5);
  m.hidden_act = c.string("activation_function", "gelu_new");
  m.tie_embeddings = c.boolean("tie_word_embeddings", true);
  m.attention_bias = true;
  m.bos_token_id = c.integer("bos_token_id", -1);
  m.eos_token_id = c.integer("eos_token_id", -1);
  m.pad_token_id = c.integer("pad_token_id", -1);
  if (c.boolean("scale_attn_by_inverse_layer_idx", false) || !c.boolean("scale_attn_weights", true))
    throw FileError(source,
                    "gpt2 attention scaling variants (scale_attn_by_inverse_layer_idx, "
                    "scale_attn_weights: false) are not supported");
  if (m.hidden_size % m.num_heads)
    throw FileError(source, "n_embd " + std::to_string(m.hidden_size) +
                                " is not divisible by n_head " + std::to_string(m.num_heads));
  return m;
}

io::TensorMap gpt2_from_hf(const ModelConfig& c, const io::TensorMap& checkpoint) {
  // GPT2LMHeadModel prefixes "transformer."; GPT2Model does not.
  io::TensorMap stripped;
  const std::string prefix = "transformer.";
  for (const auto& [name, t] : checkpoint)
    stripped.emplace(name.rfind(prefix, 0) == 0 ? name.substr(prefix.size()) : name, t);
  io::TensorMap out;
  // Older checkpoints store the causal-mask buffers, which graft builds from the shapes.
  for (auto& [name, t] :
       rename_to_graft(stripped, kHfRules, {"h.{L}.attn.bias", "h.{L}.attn.masked_bias"})) {
    // Conv1D stores [in, out]; graft::Linear wants [out, in]. The heads are nn.Linear.
    const bool matrix = t.dim() == 2 && name != "embed.weight" && name != "pos_embed.weight" &&
                        name != "head.weight";
    auto w = matrix ? t.t().contiguous() : t;
    if (ends_with(name, ".attn.qkv.weight") || ends_with(name, ".attn.qkv.bias")) {
      const auto base = name.substr(
          0,
          name.size() - std::string(ends_with(name, "weight") ? "qkv.weight" : "qkv.bias").size());
      const auto kind = ends_with(name, "weight") ? "weight" : "bias";
      TORCH_CHECK(w.size(0) == 3 * c.hidden_size, "gpt2: c_attn has ", w.size(0),
                  " outputs, expected ", 3 * c.hidden_size);
      auto parts = w.split(c.hidden_size, 0);
      out[base + "q." + kind] = parts[0].contiguous();
      out[base + "k." + kind] = parts[1].contiguous();
      out[base + "v." + kind] = parts[2].contiguous();
    } else {
      out[name] = w;
    }
  }
  return out;
}

io::TensorMap gpt2_to_hf(const ModelConfig& c, const io::TensorMap& t) {
  io::TensorMap fused;
  for (const auto& [name, w] : t) {
    for (const std::string part : {".attn.q.", ".attn.k.", ".attn.v."}) {
      auto at = name.find(part);
      if (at == std::string::npos) continue;
      const auto kind = name.substr(at + part.size());  // weight or bias
      const auto base = name.substr(0, at) + ".attn.";
      if (part == ".attn.q.")
        fused[base + "qkv." + kind] =
            torch::cat({w, t.at(base + "k." + kind), t.at(base + "v." + kind)}, 0);
    }
    if (name.find(".attn.q.") == std::string::npos && name.find(".attn.k.") == std::string::npos &&
        name.find(".attn.v.") == std::string::npos)
      fused[name] = w;
  }
  io::TensorMap out;
  for (auto& [name, w] : rename_from_graft(fused, kHfRules)) {
    if (name == "lm_head.weight") {  // nn.Linear: [out, in] as graft keeps it, outside transformer.
      if (!c.tie_embeddings) out[c.classifier == "score" ? "score.weight" : name] = w;
      continue;
    }
    // graft::Linear's [out, in] back to Conv1D's [in, out].
    const bool matrix = w.dim() == 2 && name != "wte.weight" && name != "wpe.weight";
    out["transformer." + name] = matrix ? w.t().contiguous() : w;
  }
  return out;
}

nlohmann::json gpt2_hf_config(const ModelConfig& c) {
  const std::string architecture = !c.architecture.empty()   ? c.architecture
                                   : c.classifier == "score" ? "GPT2ForSequenceClassification"
                                                             : "GPT2LMHeadModel";
  nlohmann::json j = {{"architectures", {architecture}},  {"model_type", "gpt2"},
                      {"vocab_size", c.vocab_size},       {"n_embd", c.hidden_size},
                      {"n_layer", c.num_layers},          {"n_head", c.num_heads},
                      {"n_positions", c.max_positions},   {"n_inner", c.intermediate_size},
                      {"layer_norm_epsilon", c.norm_eps}, {"activation_function", c.hidden_act},
                      {"torch_dtype", "float32"}};
  if (c.bos_token_id >= 0) j["bos_token_id"] = c.bos_token_id;
  if (c.eos_token_id >= 0) j["eos_token_id"] = c.eos_token_id;
  if (c.pad_token_id >= 0) j["pad_token_id"] = c.pad_token_id;
  if (!c.tie_embeddings) j["tie_word_embeddings"] = false;
  write_labels(j, c);
  return j;
}

}  // namespace graft::models
