// The llama family: Llama 2/3, Mistral, Qwen2, TinyLlama, stories260K. Pre-norm RMSNorm,
// grouped-query attention with rotary positions, SwiGLU feed-forward.
#include <ATen/record_function.h>
#include <graft/error.h>

#include <limits>
#include <tuple>

#include "models/common.h"
#include "models/families.h"
#include "models/fused.h"

namespace graft::models {
namespace {

class LlamaLayerImpl : public torch::nn::Module {
 public:
  explicit LlamaLayerImpl(const ModelConfig& c) : c_(c) {
    attn_norm = register_module("attn_norm", Norm(c.hidden_size, c.norm_eps, false));
    attn = register_module("attn", Attention(c, c.attention_bias, false));
    ffn_norm = register_module("ffn_norm", Norm(c.hidden_size, c.norm_eps, false));
    ffn = register_module("ffn", Ffn(c, true, false));
  }

  at::Tensor forward(at::Tensor x, const at::Tensor& cos, const at::Tensor& sin,
                     const at::Tensor& key_mask, KVCache* cache, std::int64_t layer) {
    x = attention_block(x, cos, sin, key_mask, cache, layer);
    return ffn_block(x);
  }

  LayerTaps taps;

  Norm attn_norm{nullptr}, ffn_norm{nullptr};
  Attention attn{nullptr};
  Ffn ffn{nullptr};

 private:
  // Each block is a named scope for profilers (graft_bench --train reports time per scope).
  at::Tensor attention_block(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin,
                             const at::Tensor& key_mask, KVCache* cache, std::int64_t layer) {
    RECORD_USER_SCOPE("graft::attention_block");
    auto h = tap(taps.attn_in, attn_norm(x), x);
    auto q = split_heads(attn->q(h), c_.num_heads, c_.head_dim);
    auto k = split_heads(attn->k(h), c_.num_kv_heads, c_.head_dim);
    auto v = split_heads(attn->v(h), c_.num_kv_heads, c_.head_dim);
    q = apply_rope(q, cos, sin, c_.rope_style);
    k = apply_rope(k, cos, sin, c_.rope_style);
    auto kv = layer_keys(taps.attn_kv, h, k, v, key_mask, cache, layer);
    auto a = attn->o(attend(q, kv.keys, kv.values, kv.mask, true, c_.sliding_window));
    return residual_step(taps.attn_out, tap(taps.attn_out, a, h), x);
  }

  at::Tensor ffn_block(const at::Tensor& x) {
    RECORD_USER_SCOPE("graft::ffn_block");
    auto h = tap(taps.ffn_in, ffn_norm(x), x);
    auto gate = ffn->gate(h), up = ffn->up(h);
    auto act =
        tap(taps.ffn_act,
            c_.hidden_act == "silu" ? swiglu(gate, up) : activate(gate, c_.hidden_act) * up, h);
    return residual_step(taps.ffn_out, tap(taps.ffn_out, ffn->down(act), h), x);
  }

  ModelConfig c_;
};
TORCH_MODULE(LlamaLayer);

class Llama : public Model {
 public:
  explicit Llama(ModelConfig c) : Model(std::move(c)) {
    const auto& cfg = config_;
    TORCH_CHECK(cfg.head_dim % 2 == 0, "llama: head_dim must be even for rotary embeddings");
    embed = register_module("embed", torch::nn::Embedding(cfg.vocab_size, cfg.hidden_size));
    layers = register_module("layers", torch::nn::ModuleList());
    for (std::int64_t i = 0; i < cfg.num_layers; ++i) layers->push_back(LlamaLayer(cfg));
    norm = register_module("norm", Norm(cfg.hidden_size, cfg.norm_eps, false));
    const bool classifier = cfg.classifier == "score";
    const auto head_width = classifier ? cfg.num_labels : cfg.vocab_size;
    head = register_module("head", Linear(cfg.hidden_size, head_width, false));
    if (cfg.tie_embeddings && !classifier) head->tie_weight(embed->weight);

    embed_site_ = add_site({"embed", "embed", -1, cfg.vocab_size, cfg.hidden_size});
    for (std::int64_t i = 0; i < cfg.num_layers; ++i)
      for (auto& s : layer_sites(cfg, i, true, cfg.attention_bias)) add_site(std::move(s));
    add_site({"norm", "norm.final", -1, cfg.hidden_size, cfg.hidden_size});
    add_site({"head", "head", -1, cfg.hidden_size, head_width});
    for (std::int64_t i = 0; i < cfg.num_layers; ++i)
      layers->ptr<LlamaLayerImpl>(i)->taps =
          layer_taps([this](const std::string& n) { return site_hooks(n); }, i);
    connect_sites();
  }

  bool causal() const override { return true; }

  ForwardOutput forward(const ForwardInput& in, KVCache* cache) override {
    at::Tensor x, key_mask, cos, sin;
    std::int64_t prompt = 0;
    {
      RECORD_USER_SCOPE("graft::embedding");
      auto inputs = decoder_inputs(embed(in.input_ids), in, embed_site_, cache, prefix_length());
      x = inputs.x, key_mask = inputs.key_mask, prompt = inputs.prompt;
      std::tie(cos, sin) = rope_tables(inputs.positions, config_.head_dim, config_.rope_theta);
    }
    for (std::size_t i = 0; i < layers->size(); ++i)
      x = layers->ptr<LlamaLayerImpl>(i)->forward(x, cos, sin, key_mask, cache, i);
    if (cache) cache->mask = key_mask;
    return decoder_outputs(norm(x), in, prompt, config_, *head);
  }

  torch::nn::Embedding embed{nullptr};
  torch::nn::ModuleList layers{nullptr};
  Norm norm{nullptr};
  Linear head{nullptr};

 private:
  SiteHooks* embed_site_ = nullptr;
};

const std::vector<NameRule> kHfRules = {
    {"embed.weight", "model.embed_tokens.weight"},
    {"norm.weight", "model.norm.weight"},
    {"head.weight", "lm_head.weight"},
    {"head.weight", "score.weight"},
    {"layers.{L}.attn_norm.weight", "model.layers.{L}.input_layernorm.weight"},
    {"layers.{L}.attn.q.weight", "model.layers.{L}.self_attn.q_proj.weight"},
    {"layers.{L}.attn.k.weight", "model.layers.{L}.self_attn.k_proj.weight"},
    {"layers.{L}.attn.v.weight", "model.layers.{L}.self_attn.v_proj.weight"},
    {"layers.{L}.attn.q.bias", "model.layers.{L}.self_attn.q_proj.bias"},
    {"layers.{L}.attn.k.bias", "model.layers.{L}.self_attn.k_proj.bias"},
    {"layers.{L}.attn.v.bias", "model.layers.{L}.self_attn.v_proj.bias"},
    {"layers.{L}.attn.o.weight", "model.layers.{L}.self_attn.o_proj.weight"},
    {"layers.{L}.ffn_norm.weight", "model.layers.{L}.post_attention_layernorm.weight"},
    {"layers.{L}.ffn.gate.weight", "model.layers.{L}.mlp.gate_proj.weight"},
    {"layers.{L}.ffn.up.weight", "model.layers.{L}.mlp.up_proj.weight"},
    {"layers.{L}.ffn.down.weight", "model.layers.{L}.mlp.down_proj.weight"},
};

const std::vector<NameRule> kGgufRules = {
    {"embed.weight", "token_embd.weight"},
    {"norm.weight", "output_norm.weight"},
    {"head.weight", "output.weight"},
    {"layers.{L}.attn_norm.weight", "blk.{L}.attn_norm.weight"},
    {"layers.{L}.attn.q.weight", "blk.{L}.attn_q.weight"},
    {"layers.{L}.attn.k.weight", "blk.{L}.attn_k.weight"},
    {"layers.{L}.attn.v.weight", "blk.{L}.attn_v.weight"},
    {"layers.{L}.attn.q.bias", "blk.{L}.attn_q.bias"},
    {"layers.{L}.attn.k.bias", "blk.{L}.attn_k.bias"},
    {"layers.{L}.attn.v.bias", "blk.{L}.attn_v.bias"},
    {"layers.{L}.attn.o.weight", "blk.{L}.attn_output.weight"},
    {"layers.{L}.ffn_norm.weight", "blk.{L}.ffn_norm.weight"},
    {"layers.{L}.ffn.gate.weight", "blk.{L}.ffn_gate.weight"},
    {"layers.{L}.ffn.up.weight", "blk.{L}.ffn_up.weight"},
    {"layers.{L}.ffn.down.weight", "blk.{L}.ffn_down.weight"},
};

}  // namespace

std::shared_ptr<Model> make_llama(const ModelConfig& config) {
  return std::make_shared<Llama>(config);
}

ModelConfig llama_config_from_hf(const nlohmann::json& j, const std::string& source) {
  JsonConfig c(j, source);
  ModelConfig m;
  m.family = "llama";
  const auto model_type = c.string("model_type", "llama");
  m.architecture = architecture_of(j, "LlamaForCausalLM");
  if (m.architecture.find("ForSequenceClassification") != std::string::npos) {
    m.classifier = "score";
    m.num_labels = num_labels_of(j, source);
  } else if (m.architecture.find("For") != std::string::npos &&
             m.architecture.find("ForCausalLM") == std::string::npos) {
    throw FileError(source, "architecture \"" + m.architecture +
                                "\" is not supported (graft runs *ForCausalLM and "
                                "*ForSequenceClassification models of this family)");
  }
  m.vocab_size = c.size("vocab_size");
  m.hidden_size = c.size("hidden_size");
  m.num_layers = c.size("num_hidden_layers");
  m.num_heads = c.size("num_attention_heads");
  m.num_kv_heads = c.size("num_key_value_heads", m.num_heads);
  m.head_dim = c.size("head_dim", m.hidden_size / m.num_heads);
  m.intermediate_size = c.size("intermediate_size");
  m.max_positions = c.size("max_position_embeddings", 2048);
  m.norm_eps = c.number("rms_norm_eps", 1e-6);
  m.rope_theta = c.number("rope_theta", 10000.0);
  m.rope_style = RopeStyle::half_split;
  m.tie_embeddings = c.boolean("tie_word_embeddings", false);
  m.attention_bias = c.boolean("attention_bias", model_type == "qwen2");
  m.hidden_act = c.string("hidden_act", "silu");
  // Mistral limits attention to a sliding window; Qwen2 has one only with use_sliding_window.
  if (model_type == "mistral" || c.boolean("use_sliding_window", false))
    m.sliding_window = c.integer("sliding_window", 0);
  m.bos_token_id = c.integer("bos_token_id", -1);
  m.eos_token_id = c.has("eos_token_id") && j["eos_token_id"].is_number_integer()
                       ? j["eos_token_id"].get<std::int64_t>()
                       : -1;
  m.pad_token_id = c.integer("pad_token_id", -1);
  if (c.has("rope_scaling"))
    throw FileError(source,
                    "rope_scaling is not supported yet (found " + j["rope_scaling"].dump() + ")");
  return m;
}

io::TensorMap llama_from_hf(const ModelConfig&, const io::TensorMap& t) {
  // Older checkpoints store the rotary inverse frequencies, which graft computes from the config.
  return rename_to_graft(t, kHfRules, {"model.layers.{L}.self_attn.rotary_emb.inv_freq"});
}

ModelConfig config_from_gguf(const io::GgufFile& f) {
  const auto arch = f.at("general.architecture").as_string("general.architecture");
  if (arch != "llama" && arch != "mistral" && arch != "qwen2")
    throw FileError(f.path().string(), "GGUF architecture \"" + arch +
                                           "\" is not supported (graft reads llama, mistral "
                                           "and qwen2)");
  auto key = [&](const std::string& k) { return arch + "." + k; };
  auto integer = [&](const std::string& k) {
    const auto v = f.at(key(k)).as_int(key(k));
    // Widths, counts and lengths: positive, before anything divides by them or allocates.
    if (v < 1 || v > std::numeric_limits<std::int32_t>::max())
      throw FileError(f.path().string(),
                      key(k) + ": expected a positive size, got " + std::to_string(v));
    return v;
  };
  ModelConfig m;
  m.family = "llama";
  m.architecture = arch == "qwen2"     ? "Qwen2ForCausalLM"
                   : arch == "mistral" ? "MistralForCausalLM"
                                       : "LlamaForCausalLM";
  m.hidden_size = integer("embedding_length");
  m.num_layers = integer("block_count");
  m.num_heads = integer("attention.head_count");
  m.num_kv_heads =
      f.find(key("attention.head_count_kv")) ? integer("attention.head_count_kv") : m.num_heads;
  m.head_dim = f.find(key("rope.dimension_count")) ? integer("rope.dimension_count")
                                                   : m.hidden_size / m.num_heads;
  m.intermediate_size = integer("feed_forward_length");
  m.max_positions = f.find(key("context_length")) ? integer("context_length") : 2048;
  m.norm_eps = f.at(key("attention.layer_norm_rms_epsilon"))
                   .as_double(key("attention.layer_norm_rms_epsilon"));
  if (auto* v = f.find(key("rope.freq_base"))) m.rope_theta = v->as_double(key("rope.freq_base"));
  // llama.cpp's converter permutes llama q/k weights to the interleaved pairing (qwen2 keeps
  // Hugging Face's half-split one); graft runs every checkpoint in transformers' order, so that
  // an adapter means the same on a GGUF file and on the Hugging Face folder it came from.
  m.rope_style = RopeStyle::half_split;
  if (f.find(key("attention.sliding_window")))
    m.sliding_window = integer("attention.sliding_window");
  m.attention_bias = f.find_tensor("blk.0.attn_q.bias") != nullptr;
  m.tie_embeddings = f.find_tensor("output.weight") == nullptr;
  m.hidden_act = "silu";
  auto* embd = f.find_tensor("token_embd.weight");
  if (!embd) throw FileError(f.path().string(), "missing tensor 'token_embd.weight'");
  m.vocab_size = embd->shape[0];
  auto token_id = [&](const char* k) -> std::int64_t {
    auto* v = f.find(k);
    if (!v) return -1;
    auto id = v->as_int(k);
    return id == 0xFFFFFFFF ? -1 : id;  // llama.cpp writes (uint32)-1 for "none"
  };
  m.bos_token_id = token_id("tokenizer.ggml.bos_token_id");
  m.eos_token_id = token_id("tokenizer.ggml.eos_token_id");
  m.pad_token_id = token_id("tokenizer.ggml.padding_token_id");
  check_config(m, f.path().string());
  return m;
}

namespace {

// q and k rows reordered from the pairing `from` to `to`.
io::TensorMap with_rope_order(const ModelConfig& c, io::TensorMap t, RopeStyle from, RopeStyle to) {
  for (auto& [name, w] : t) {
    const bool q = name.find(".attn.q.") != std::string::npos;
    const bool k = name.find(".attn.k.") != std::string::npos;
    if (!q && !k) continue;
    const auto heads = q ? c.num_heads : c.num_kv_heads;
    if (w.dim() < 1 || w.size(0) != heads * c.head_dim)  // checked before its rows are reordered
      throw Error("tensor '" + name + "' has shape " + c10::str(w.sizes()) + ", but " +
                  std::to_string(heads) + " heads of " + std::to_string(c.head_dim) + " need " +
                  std::to_string(heads * c.head_dim) + " rows");
    w = permute_rope_rows(w, heads, from, to);
  }
  return t;
}

io::TensorMap with_rope_order(const ModelConfig& c, io::TensorMap t, RopeStyle to) {
  return with_rope_order(c, std::move(t), c.rope_style, to);
}

}  // namespace

io::TensorMap from_gguf(const ModelConfig& c, const io::TensorMap& tensors) {
  return with_rope_order(c, rename_to_graft(tensors, kGgufRules), gguf_rope_order(c), c.rope_style);
}

io::TensorMap llama_to_hf(const ModelConfig& c, const io::TensorMap& t) {
  auto out = rename_from_graft(with_rope_order(c, t, RopeStyle::half_split), kHfRules);
  if (c.classifier == "score") {
    out["score.weight"] = out.at("lm_head.weight");
    out.erase("lm_head.weight");
  }
  if (c.tie_embeddings) out.erase("lm_head.weight");
  return out;
}

io::TensorMap to_gguf(const ModelConfig& c, const io::TensorMap& t) {
  if (c.family != "llama") throw Error("GGUF output is for the llama family; this is " + c.family);
  if (c.classifier == "score")
    throw Error("GGUF output holds language models; this model is a sequence classifier");
  auto out = rename_from_graft(with_rope_order(c, t, gguf_rope_order(c)), kGgufRules);
  if (c.tie_embeddings) out.erase("output.weight");
  return out;
}

nlohmann::json llama_hf_config(const ModelConfig& c) {
  const std::string type = c.architecture.rfind("Qwen2", 0) == 0     ? "qwen2"
                           : c.architecture.rfind("Mistral", 0) == 0 ? "mistral"
                                                                     : "llama";
  const std::string architecture = !c.architecture.empty()   ? c.architecture
                                   : c.classifier == "score" ? "LlamaForSequenceClassification"
                                                             : "LlamaForCausalLM";
  nlohmann::json j = {{"architectures", {architecture}},
                      {"model_type", type},
                      {"vocab_size", c.vocab_size},
                      {"hidden_size", c.hidden_size},
                      {"intermediate_size", c.intermediate_size},
                      {"num_hidden_layers", c.num_layers},
                      {"num_attention_heads", c.num_heads},
                      {"num_key_value_heads", c.num_kv_heads},
                      {"head_dim", c.head_dim},
                      {"max_position_embeddings", c.max_positions},
                      {"rms_norm_eps", c.norm_eps},
                      {"rope_theta", c.rope_theta},
                      {"hidden_act", c.hidden_act},
                      {"tie_word_embeddings", c.tie_embeddings},
                      {"attention_bias", c.attention_bias},
                      {"torch_dtype", "float32"}};
  if (c.bos_token_id >= 0) j["bos_token_id"] = c.bos_token_id;
  if (c.eos_token_id >= 0) j["eos_token_id"] = c.eos_token_id;
  if (c.pad_token_id >= 0) j["pad_token_id"] = c.pad_token_id;
  if (c.sliding_window > 0) j["sliding_window"] = c.sliding_window;
  if (type == "qwen2") j["use_sliding_window"] = c.sliding_window > 0;
  write_labels(j, c);
  return j;
}

}  // namespace graft::models

namespace graft {

RopeStyle gguf_rope_order(const ModelConfig& c) {
  return c.architecture.rfind("Qwen2", 0) == 0 ? RopeStyle::half_split : RopeStyle::interleaved;
}

}  // namespace graft
