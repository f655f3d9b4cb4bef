// The native model families' common interface: configuration, injection sites, the one linear
// choke point every projection goes through, the forward pass and its key/value cache.
#pragma once

#include <ATen/core/Tensor.h>
#include <graft/hooks.h>
#include <graft/tokenizer.h>
#include <torch/nn/module.h>
#include <torch/nn/pimpl.h>

#include <cstdint>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

namespace graft {

/// How rotary position embeddings pair up the dimensions of a head.
enum class RopeStyle {
  interleaved,  ///< adjacent pairs (x0, x1), (x2, x3), ...: llama2.c, GGUF llama files
  half_split,   ///< pairs (x_i, x_{i + d/2}): Hugging Face checkpoints
};

/// Everything needed to build a model of one family. Field names follow Hugging Face's
/// config.json where one exists.
struct ModelConfig {
  std::string family;        ///< "llama", "bert" or "gpt2"
  std::string architecture;  ///< e.g. "LlamaForCausalLM", "BertForSequenceClassification"
  std::int64_t vocab_size = 0;
  std::int64_t hidden_size = 0;  ///< d
  std::int64_t num_layers = 0;
  std::int64_t num_heads = 0;     ///< query heads
  std::int64_t num_kv_heads = 0;  ///< key/value heads (grouped-query attention when fewer)
  std::int64_t head_dim = 0;
  std::int64_t intermediate_size = 0;  ///< feed-forward width
  std::int64_t max_positions = 0;      ///< learned-position table size, or trained context
  double norm_eps = 1e-5;
  double rope_theta = 10000.0;
  RopeStyle rope_style = RopeStyle::half_split;
  bool tie_embeddings = false;      ///< the LM head reuses the token embedding matrix
  std::int64_t sliding_window = 0;  ///< Mistral: attend to at most this many latest tokens; 0 = all
  bool attention_bias = false;      ///< biases on q, k, v (Qwen2; always on for bert and gpt2)
  std::string hidden_act;           ///< "silu", "gelu" (erf), "gelu_new" (tanh approximation)
  std::int64_t type_vocab_size = 0;  ///< bert token types
  std::int64_t num_labels = 0;       ///< classifier width; 0 means no classification head
  /// "" none; "pooler" (BERT: the pooled first token), "roberta" (dense + out_proj on the first
  /// token), "score" (decoders: a linear head on the last token, found as transformers does)
  std::string classifier;
  bool roberta_positions = false;  ///< positions start at pad_token_id + 1 and skip padding
  std::int64_t pad_token_id = -1;
  std::int64_t bos_token_id = -1;
  std::int64_t eos_token_id = -1;
  /// Where the model came from, as peft's base_model_name_or_path records it: config.json's
  /// _name_or_path (a hub id) when it has one, else the folder or file it was loaded from; empty
  /// for a model built in memory.
  std::string name_or_path;

  nlohmann::json to_json() const;
};

/// One injection site: where a method can attach. Names read like module paths
/// ("layers.3.attn.q", "embed", "head"); points come from one closed vocabulary shared by all
/// families (see docs/sites.md).
struct Site {
  std::string name;
  std::string point;              ///< "attn.q", "ffn.act", "norm.attn", ...
  std::int64_t layer = -1;        ///< layer index, or -1 outside the layer stack
  std::int64_t in_features = 0;   ///< linear sites: input width; other sites: the width seen
  std::int64_t out_features = 0;  ///< linear sites: output width; other sites: the width seen
};

/// Reorders the rows of a q or k projection ([heads * head_dim, ...] weight, bias or update)
/// between the half-split and the interleaved RoPE pairing, as llama.cpp's converter does.
at::Tensor permute_rope_rows(const at::Tensor& w, std::int64_t heads, RopeStyle from, RopeStyle to);

/// The q/k row order of GGUF files for a model's architecture, as llama.cpp's converter writes
/// them: interleaved for llama and mistral, half-split for qwen2. graft itself runs every model
/// it loads in the half-split order of Hugging Face checkpoints.
RopeStyle gguf_rope_order(const ModelConfig& config);

/// The closed vocabulary of site points, in the order a layer meets them.
const std::vector<std::string>& site_points();

/// The one linear choke point: every projection of every family is a graft::Linear, so a method
/// written against it works on all of them. y = x W^T + b, W: [out, in], b: [out]. With hooks
/// attached at its site, the forward composes them in the order documented in hooks.h.
class LinearImpl : public torch::nn::Module {
 public:
  LinearImpl(std::int64_t in_features, std::int64_t out_features, bool bias);
  /// x: [..., in] -> [..., out]
  at::Tensor forward(const at::Tensor& x) {
    if (!hooks_ || !hooks_->active) return plain(x);
    return hooked(x);
  }
  /// The base projection alone, ignoring every hook.
  at::Tensor plain(const at::Tensor& x) const;
  /// The weight the forward uses: the base weight after the site's weight transforms.
  at::Tensor effective_weight() const;
  /// Shares `weight` (e.g. a tied LM head uses the embedding matrix) without registering it as
  /// this module's parameter.
  void tie_weight(const at::Tensor& weight);
  /// Whether the weight is shared with another module (tie_weight) rather than its own.
  bool tied() const { return shared_.defined() && weight.is_same(shared_); }
  /// Gives a tied projection a copy of the shared weight as its own parameter, so that changing
  /// it leaves the other module alone; retie() shares the other module's weight again.
  void untie();
  void retie();
  /// Connects the module to its site's hooks (done by the model when it enumerates its sites).
  void connect(SiteHooks* hooks) { hooks_ = hooks; }
  /// Gives the projection a bias (zeros) where it had none: for methods that train biases.
  void add_bias();

  at::Tensor weight;
  at::Tensor bias;  ///< undefined when the projection has none
  std::int64_t in_features, out_features;

 private:
  at::Tensor hooked(const at::Tensor& x);
  SiteHooks* hooks_ = nullptr;
  at::Tensor shared_;  // the weight tie_weight() shares, kept through untie()
};
TORCH_MODULE(Linear);

/// The inputs of one forward pass.
struct ForwardInput {
  at::Tensor input_ids;       ///< [batch, seq] int64
  at::Tensor attention_mask;  ///< [batch, seq], 1 for tokens and 0 for padding; undefined = all 1
  at::Tensor token_type_ids;  ///< [batch, seq] (bert); undefined = zeros
  /// [batch, seq]: the tokens' positions as if nothing learned stood in front of them; the model
  /// adds the length of any key/value prefix and prompt (which take the positions before them),
  /// as transformers numbers tokens after a cached prefix. Undefined: the family's default (see
  /// Model). transformers' plain forward numbers every row's columns 0..seq-1, padding included.
  at::Tensor position_ids;
  /// Also return the hidden states and logits at the prompt positions an embed site prepends (in
  /// front of the tokens' own), as peft's forward does; by default they are dropped.
  bool prompt_outputs = false;
  /// A language model's final hidden states only: the head is not applied and logits stay
  /// undefined (the training loss applies the head itself, a chunk of rows at a time).
  bool hidden_only = false;
};

/// The outputs of one forward pass.
struct ForwardOutput {
  at::Tensor
      logits;  ///< [batch, seq, vocab] (LM) or [batch, num_labels] (classifier); may be undefined
  at::Tensor hidden;  ///< [batch, seq, d]: the last hidden states (after the final norm)
  at::Tensor pooled;  ///< [batch, d]: bert's pooler output; a decoder classifier's input
};

/// Keys and values of the tokens seen so far, per layer, for incremental decoding.
struct KVCache {
  std::vector<at::Tensor> keys;      ///< per layer: [batch, kv_heads, cached, head_dim]
  std::vector<at::Tensor> values;    ///< per layer: [batch, kv_heads, cached, head_dim]
  std::vector<std::int64_t> prefix;  ///< per layer: leading entries that are learned prefixes
  std::int64_t prompt = 0;           ///< prompt positions the first pass prepended
  at::Tensor mask;                   ///< [batch, cached]: the attention mask of the cached tokens
  std::int64_t length() const { return mask.defined() ? mask.size(1) : 0; }
};

/// How a method claims a site: shared with other methods, or alone.
enum class Claim { shared, exclusive };

/// A native libtorch model. Positions: causal families (llama, gpt2) number each row's tokens
/// from its first unmasked token (so left padding does not shift them, as in transformers'
/// generate); bert numbers them 0..seq-1, roberta from pad_token_id + 1 over unmasked tokens.
class Model : public torch::nn::Module {
 public:
  explicit Model(ModelConfig config) : config_(std::move(config)) {}
  const ModelConfig& config() const { return config_; }
  const std::vector<Site>& sites() const { return sites_; }
  /// The site named `name`, or nullptr.
  const Site* find_site(const std::string& name) const;
  /// Whether attention is causal (decoder) or bidirectional (encoder).
  virtual bool causal() const = 0;
  /// One forward pass. With a cache, `in` holds only the new tokens and their mask; the cache
  /// is extended with them.
  virtual ForwardOutput forward(const ForwardInput& in, KVCache* cache = nullptr) = 0;

  /// Attaches a hook of a kind the site's point accepts (linear kinds at linear sites, sublayer
  /// transforms at attn.in, attn.out, ffn.in, ffn.act and ffn.out, KV extensions at attn.kv,
  /// embedding extensions at embed). Throws graft::Error for an unknown site, a kind the site
  /// does not take, or a claim conflicting with an exclusive one, naming the site and methods.
  void attach(const std::string& site, std::shared_ptr<Hook> hook, const std::string& method,
              Claim claim = Claim::shared);
  /// Removes `hook` from `site` (a no-op when it is not attached there).
  void detach(const std::string& site, const std::shared_ptr<Hook>& hook);
  /// Routes the rows of the next forwards per hook (see RowRouting); null ends the routing.
  /// graft::AdapterSet::route sets it after checking that every routed hook acts row by row.
  void set_routing(std::shared_ptr<const RowRouting> routing);
  /// What is attached at `site`; throws graft::Error for an unknown site.
  const SiteHooks& hooks(const std::string& site) const;
  /// The graft::Linear at a linear site, or nullptr for other sites.
  LinearImpl* linear(const std::string& site);
  /// Unties a linear site's weight from the module it shares it with (a head tied to the token
  /// embedding gets a weight of its own, and the configuration says so), before a method merges
  /// into one of the two; retie() undoes it. No-ops for a weight that is not shared.
  void untie(const std::string& site);
  void retie(const std::string& site);

  /// Whether a point is a linear projection (attn.q ... ffn.down, head).
  static bool is_linear_point(const std::string& point);
  /// The linear projection points, in layer order, the head last.
  static const std::vector<std::string>& linear_points();

  /// The longest key/value prefix any layer's attn.kv site adds that shifts positions: the real
  /// tokens' positions start after it (transformers numbers tokens after the cached prefix).
  std::int64_t prefix_length() const;
  /// The most key/value positions any layer's prefixes add, shifting positions or not.
  std::int64_t prefix_keys() const;

  /// The tokenizer the checkpoint carried (set by load_model), or nullptr: for methods that
  /// initialise from text (soft prompts).
  const Tokenizer* tokenizer() const { return tokenizer_.get(); }
  void set_tokenizer(std::shared_ptr<Tokenizer> tokenizer) { tokenizer_ = std::move(tokenizer); }

 protected:
  /// Registers a site and returns its hooks (stable for the model's life). Linear sites are
  /// connected to their graft::Linear module of the same name by connect_sites().
  SiteHooks* add_site(Site site);
  /// The hooks of a site added earlier, for a family's forward to consult.
  SiteHooks* site_hooks(const std::string& name);
  /// Connects every linear site to the graft::Linear module at the same path. Families call it
  /// at the end of their constructor.
  void connect_sites();
  ModelConfig config_;

 private:
  std::int64_t longest_prefix(bool shifting_only) const;
  std::vector<Site> sites_;
  std::vector<std::unique_ptr<SiteHooks>> hooks_;
  std::map<std::string, std::size_t> index_;
  std::shared_ptr<Tokenizer> tokenizer_;
};

}  // namespace graft
