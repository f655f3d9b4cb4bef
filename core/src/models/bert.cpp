// The bert family: BERT and RoBERTa encoders. Post-norm LayerNorm, bidirectional attention,
// learned absolute positions and token types, the pooler, and the sequence-classification heads
// of BertForSequenceClassification (on the pooled output) and RobertaForSequenceClassification
// (dense + tanh + out_proj on the first token).
#include <graft/error.h>

#include "models/common.h"
#include "models/families.h"

namespace graft::models {
namespace {

class BertLayerImpl : public torch::nn::Module {
 public:
  explicit BertLayerImpl(const ModelConfig& c) : c_(c) {
    attn = register_module("attn", Attention(c, true, true));
    attn_norm = register_module("attn_norm", Norm(c.hidden_size, c.norm_eps, true));
    ffn = register_module("ffn", Ffn(c, false, true));
    ffn_norm = register_module("ffn_norm", Norm(c.hidden_size, c.norm_eps, true));
  }
  // The sublayer outputs pass through residual_step(), where AdapterHub's adapters sit.
  at::Tensor forward(at::Tensor x, const at::Tensor& key_mask, std::int64_t layer) {
    auto h = tap(taps.attn_in, x, x);
    auto q = split_heads(attn->q(h), c_.num_heads, c_.head_dim);
    auto k = split_heads(attn->k(h), c_.num_heads, c_.head_dim);
    auto v = split_heads(attn->v(h), c_.num_heads, c_.head_dim);
    auto kv = layer_keys(taps.attn_kv, h, k, v, key_mask, nullptr, layer);
    const ResidualTransform::Norm norm1 = [this](const at::Tensor& t) { return attn_norm(t); };
    x = residual_step(taps.attn_out,
                      tap(taps.attn_out, attn->o(attend(q, kv.keys, kv.values, kv.mask, false)), h),
                      x, &norm1);
    h = tap(taps.ffn_in, x, x);
    auto act = tap(taps.ffn_act, activate(ffn->up(h), c_.hidden_act), h);
    const ResidualTransform::Norm norm2 = [this](const at::Tensor& t) { return ffn_norm(t); };
    return residual_step(taps.ffn_out, tap(taps.ffn_out, ffn->down(act), h), x, &norm2);
  }
  LayerTaps taps;
  Attention attn{nullptr};
  Norm attn_norm{nullptr}, ffn_norm{nullptr};
  Ffn ffn{nullptr};

 private:
  ModelConfig c_;
};
TORCH_MODULE(BertLayer);

class Bert : public Model {
 public:
  explicit Bert(ModelConfig c) : Model(std::move(c)) {
    const auto& cfg = config_;
    const auto d = cfg.hidden_size;
    embed = register_module("embed", torch::nn::Embedding(cfg.vocab_size, d));
    pos_embed = register_module("pos_embed", torch::nn::Embedding(cfg.max_positions, d));
    type_embed = register_module(
        "type_embed", torch::nn::Embedding(std::max<std::int64_t>(cfg.type_vocab_size, 1), d));
    embed_norm = register_module("embed_norm", Norm(d, cfg.norm_eps, true));
    layers = register_module("layers", torch::nn::ModuleList());
    for (std::int64_t i = 0; i < cfg.num_layers; ++i) layers->push_back(BertLayer(cfg));
    if (cfg.classifier != "roberta") pooler = register_module("pooler", Linear(d, d, true));
    if (cfg.classifier == "roberta") head_dense = register_module("head_dense", Linear(d, d, true));
    if (!cfg.classifier.empty()) head = register_module("head", Linear(d, cfg.num_labels, true));

    embed_site_ = add_site({"embed", "embed", -1, cfg.vocab_size, d});
    add_site({"embed_norm", "norm.embed", -1, d, d});
    for (std::int64_t i = 0; i < cfg.num_layers; ++i)
      for (auto& s : layer_sites(cfg, i, false, true)) add_site(std::move(s));
    if (head) add_site({"head", "head", -1, d, cfg.num_labels});
    for (std::int64_t i = 0; i < cfg.num_layers; ++i)
      layers->ptr<BertLayerImpl>(i)->taps =
          layer_taps([this](const std::string& n) { return site_hooks(n); }, i);
    connect_sites();
  }

  bool causal() const override { return false; }

  ForwardOutput forward(const ForwardInput& in, KVCache* cache) override {
    TORCH_CHECK(cache == nullptr, "bert is an encoder: it has no key/value cache");
    auto words = embed(in.input_ids);
    auto key_mask = token_mask(in.input_ids, in.attention_mask);
    auto prompt = add_prompts(embed_site_, words, key_mask, nullptr);
    const auto batch = words.size(0), seq = words.size(1);
    // Tokens are numbered after a key/value prefix, as transformers does with a cache.
    const auto prefix = prefix_length();
    at::Tensor positions;
    if (in.position_ids.defined()) {
      positions = given_positions(in.position_ids, in.input_ids, prefix, 0, prompt);
    } else {
      if (config_.roberta_positions) {
        // RoBERTa numbers tokens from padding_idx + 1 and gives padding the padding index.
        positions = (key_mask.cumsum(1) + prefix) * key_mask + config_.pad_token_id;
      } else {
        positions = torch::arange(prefix, prefix + seq, key_mask.options()).expand({batch, seq});
      }
    }
    auto types = in.token_type_ids.defined() ? in.token_type_ids : torch::zeros_like(in.input_ids);
    if (prompt > 0) types = torch::cat({torch::zeros({batch, prompt}, types.options()), types}, 1);
    auto x = embed_norm(words + pos_embed(positions) + type_embed(types));
    // AdapterHub's prompts go after the embedding module; the tokens keep their positions.
    const auto late = add_prompts(embed_site_, x, key_mask, nullptr, true);
    prompt += late;
    for (std::size_t i = 0; i < layers->size(); ++i)
      x = layers->ptr<BertLayerImpl>(i)->forward(x, key_mask, i);
    // As in peft, the classifier reads the first position, a prompt vector when there are any;
    // prompt positions are dropped from the hidden states returned.
    auto first = x.select(1, 0);
    ForwardOutput out;
    out.hidden = in.prompt_outputs ? x : x.slice(1, prompt);
    if (pooler) out.pooled = torch::tanh(pooler(first));
    if (config_.classifier == "pooler") out.logits = head(out.pooled);
    if (config_.classifier == "roberta") out.logits = head(torch::tanh(head_dense(first)));
    return out;
  }

  torch::nn::Embedding embed{nullptr}, pos_embed{nullptr}, type_embed{nullptr};
  Norm embed_norm{nullptr};
  torch::nn::ModuleList layers{nullptr};
  Linear pooler{nullptr}, head_dense{nullptr}, head{nullptr};

 private:
  SiteHooks* embed_site_ = nullptr;
};

const std::vector<NameRule> kHfRules = {
    {"embed.weight", "embeddings.word_embeddings.weight"},
    {"pos_embed.weight", "embeddings.position_embeddings.weight"},
    {"type_embed.weight", "embeddings.token_type_embeddings.weight"},
    {"embed_norm.weight", "embeddings.LayerNorm.weight"},
    {"embed_norm.bias", "embeddings.LayerNorm.bias"},
    {"layers.{L}.attn.q.weight", "encoder.layer.{L}.attention.self.query.weight"},
    {"layers.{L}.attn.q.bias", "encoder.layer.{L}.attention.self.query.bias"},
    {"layers.{L}.attn.k.weight", "encoder.layer.{L}.attention.self.key.weight"},
    {"layers.{L}.attn.k.bias", "encoder.layer.{L}.attention.self.key.bias"},
    {"layers.{L}.attn.v.weight", "encoder.layer.{L}.attention.self.value.weight"},
    {"layers.{L}.attn.v.bias", "encoder.layer.{L}.attention.self.value.bias"},
    {"layers.{L}.attn.o.weight", "encoder.layer.{L}.attention.output.dense.weight"},
    {"layers.{L}.attn.o.bias", "encoder.layer.{L}.attention.output.dense.bias"},
    {"layers.{L}.attn_norm.weight", "encoder.layer.{L}.attention.output.LayerNorm.weight"},
    {"layers.{L}.attn_norm.bias", "encoder.layer.{L}.attention.output.LayerNorm.bias"},
    {"layers.{L}.ffn.up.weight", "encoder.layer.{L}.intermediate.dense.weight"},
    {"layers.{L}.ffn.up.bias", "encoder.layer.{L}.intermediate.dense.bias"},
    {"layers.{L}.ffn.down.weight", "encoder.layer.{L}.output.dense.weight"},
    {"layers.{L}.ffn.down.bias", "encoder.layer.{L}.output.dense.bias"},
    {"layers.{L}.ffn_norm.weight", "encoder.layer.{L}.output.LayerNorm.weight"},
    {"layers.{L}.ffn_norm.bias", "encoder.layer.{L}.output.LayerNorm.bias"},
    {"pooler.weight", "pooler.dense.weight"},
    {"pooler.bias", "pooler.dense.bias"},
    {"head_dense.weight", "classifier.dense.weight"},
    {"head_dense.bias", "classifier.dense.bias"},
    {"head.weight", "classifier.out_proj.weight"},
    {"head.bias", "classifier.out_proj.bias"},
    {"head.weight", "classifier.weight"},
    {"head.bias", "classifier.bias"},
};

}  // namespace

std::shared_ptr<Model> make_bert(const ModelConfig& config) {
  return std::make_shared<Bert>(config);
}

ModelConfig bert_config_from_hf(const nlohmann::json& j, const std::string& source) {
  JsonConfig c(j, source);
  ModelConfig m;
  m.family = "bert";
  const auto type = c.string("model_type", "bert");
  m.architecture = architecture_of(j, type == "roberta" ? "RobertaModel" : "BertModel");
  m.vocab_size = c.size("vocab_size");
  m.hidden_size = c.size("hidden_size");
  m.num_layers = c.size("num_hidden_layers");
  m.num_heads = m.num_kv_heads = c.size("num_attention_heads");
  m.head_dim = m.hidden_size / m.num_heads;
  m.intermediate_size = c.size("intermediate_size");
  m.max_positions = c.size("max_position_embeddings", 512);
  m.type_vocab_size = c.size("type_vocab_size", 2);
  m.norm_eps = c.number("layer_norm_eps", 1e-12);
  m.hidden_act = c.string("hidden_act", "gelu");
  m.pad_token_id = c.integer("pad_token_id", type == "roberta" ? 1 : 0);
  m.roberta_positions = type == "roberta";
  m.attention_bias = true;
  if (c.string("position_embedding_type", "absolute") != "absolute")
    throw FileError(source, "position_embedding_type \"" + c.string("position_embedding_type", "") +
                                "\" is not supported (graft reads \"absolute\")");
  if (m.architecture.find("ForSequenceClassification") != std::string::npos) {
    m.classifier = type == "roberta" ? "roberta" : "pooler";
    m.num_labels = num_labels_of(j, source);
  }
  return m;
}

io::TensorMap bert_from_hf(const ModelConfig&, const io::TensorMap& checkpoint) {
  // BertModel has no prefix; the task models put the encoder under "bert." or "roberta.". Old
  // TensorFlow-era checkpoints call LayerNorm's parameters gamma and beta.
  io::TensorMap stripped;
  for (const auto& [name, t] : checkpoint) {
    std::string n = name;
    for (const std::string prefix : {"bert.", "roberta."})
      if (n.rfind(prefix, 0) == 0) n = n.substr(prefix.size());
    for (const auto& [from, to] :
         {std::pair<std::string, std::string>{".gamma", ".weight"}, {".beta", ".bias"}})
      if (n.size() > from.size() && n.compare(n.size() - from.size(), from.size(), from) == 0)
        n = n.substr(0, n.size() - from.size()) + to;
    stripped.emplace(n, t);
  }
  // Pre-training checkpoints carry the masked-LM and next-sentence heads, which graft does not
  // run (it gives the encoder's states and the pooled output); older ones a position-id buffer.
  return rename_to_graft(stripped, kHfRules, {"cls.*", "lm_head.*", "embeddings.position_ids"});
}

io::TensorMap bert_to_hf(const ModelConfig& c, const io::TensorMap& t) {
  // The task models keep the encoder under bert. / roberta.; the head names differ by family.
  const std::string prefix =
      c.classifier.empty() ? "" : (c.roberta_positions ? "roberta." : "bert.");
  io::TensorMap out;
  for (const auto& [name, w] : t) {
    if (name == "head.weight" || name == "head.bias") {
      const auto kind = name.substr(5);
      out[(c.classifier == "roberta" ? "classifier.out_proj." : "classifier.") + kind] = w;
      continue;
    }
    for (const auto& [hf_name, tensor] : rename_from_graft({{name, w}}, kHfRules))
      out[(hf_name.rfind("classifier.", 0) == 0 ? "" : prefix) + hf_name] = tensor;
  }
  return out;
}

nlohmann::json bert_hf_config(const ModelConfig& c) {
  const bool roberta = c.roberta_positions;
  nlohmann::json j = {{"architectures", {c.architecture}},
                      {"model_type", roberta ? "roberta" : "bert"},
                      {"vocab_size", c.vocab_size},
                      {"hidden_size", c.hidden_size},
                      {"num_hidden_layers", c.num_layers},
                      {"num_attention_heads", c.num_heads},
                      {"intermediate_size", c.intermediate_size},
                      {"max_position_embeddings", c.max_positions},
                      {"type_vocab_size", c.type_vocab_size},
                      {"layer_norm_eps", c.norm_eps},
                      {"hidden_act", c.hidden_act},
                      {"pad_token_id", c.pad_token_id},
                      {"position_embedding_type", "absolute"},
                      {"torch_dtype", "float32"}};
  write_labels(j, c);
  return j;
}

}  // namespace graft::models
