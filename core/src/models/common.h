// Building blocks shared by the model families: norms, rotary embeddings, attention, positions,
// site lists and checkpoint renaming.
#pragma once

#include <graft/io/tensors.h>
#include <graft/model.h>
#include <torch/torch.h>

#include <functional>
#include <string>
#include <utility>
#include <vector>

namespace graft::models {

/// A norm's gain (and, for LayerNorm, bias) as a module, so that parameters read
/// "layers.0.attn_norm.weight".
class NormImpl : public torch::nn::Module {
 public:
  NormImpl(std::int64_t width, double eps, bool layer_norm);
  at::Tensor forward(const at::Tensor& x);
  at::Tensor weight, bias;
  double eps;
  bool layer_norm;
};
TORCH_MODULE(Norm);

/// The attention mask of the new tokens as int64 [batch, seq]: `mask`, or ones when undefined.
at::Tensor token_mask(const at::Tensor& input_ids, const at::Tensor& mask);
/// The attention mask of all keys as int64 [batch, keys]: the cache's mask followed by `mask`.
at::Tensor full_key_mask(const at::Tensor& mask, const KVCache* cache);

/// Positions of the last `new_tokens` columns of `key_mask` counted over unmasked tokens only:
/// cumsum(mask) - 1, clamped at 0. [batch, new_tokens] int64.
at::Tensor positions_from_mask(const at::Tensor& key_mask, std::int64_t new_tokens);

/// Rotary embedding tables for `positions` [batch, seq]: cos and sin, each [batch, 1, seq, dim/2]
/// in float32, with inverse frequencies theta^(-2i/dim).
std::pair<at::Tensor, at::Tensor> rope_tables(const at::Tensor& positions, std::int64_t dim,
                                              double theta);
/// Rotates x [batch, heads, seq, dim] by the tables, pairing dimensions by `style`.
at::Tensor apply_rope(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin,
                      RopeStyle style);

/// Scaled dot-product attention with grouped-query heads. q: [batch, heads, seq, dim];
/// k, v: [batch, kv_heads, keys, dim]; key_mask: [batch, keys] (0 = padding). With `causal`, the
/// seq queries are the last seq of the keys, and a positive `window` limits each query to the
/// `window` latest keys, itself included (Mistral's sliding window). Returns
/// [batch, seq, heads * dim]. Masked scores use the lowest float rather than -inf so that fully
/// padded rows stay finite.
at::Tensor attend(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                  const at::Tensor& key_mask, bool causal, std::int64_t window = 0);

/// Splits [batch, seq, heads * dim] into [batch, heads, seq, dim].
at::Tensor split_heads(const at::Tensor& x, std::int64_t heads, std::int64_t dim);

/// Appends this layer's new keys and values to the cache (when there is one) and returns the full
/// keys and values to attend over.
std::pair<at::Tensor, at::Tensor> extend_cache(KVCache* cache, std::int64_t layer, at::Tensor k,
                                               at::Tensor v);

/// The keys, values and key mask one layer attends over: on the first pass, the attn.kv site's
/// prefixes go before the new keys (and into the cache); then the cache is extended; the mask
/// gains ones for the prefix.
struct LayerKeys {
  at::Tensor keys, values, mask;
};
LayerKeys layer_keys(SiteHooks* kv, const at::Tensor& input, at::Tensor k, at::Tensor v,
                     const at::Tensor& key_mask, KVCache* cache, std::int64_t layer);

/// Prepends the embed site's prompt vectors to x [batch, seq, d] and ones to mask [batch, seq]
/// on the first pass (no cache, or an empty one): those placed before the embedding module, or
/// with `after_embedding` those placed after it. Returns how many positions were prepended.
std::int64_t add_prompts(SiteHooks* embed, at::Tensor& x, at::Tensor& mask, const KVCache* cache,
                         bool after_embedding = false);

/// Positions given by the caller (ForwardInput::position_ids, [batch, seq]) moved past `prefix`
/// learned key/value positions and `prompt` prompt positions, with the positions of the `added`
/// prompt vectors prepended in this pass in front: [batch, added + seq] int64.
at::Tensor given_positions(const at::Tensor& position_ids, const at::Tensor& input_ids,
                           std::int64_t prefix, std::int64_t prompt, std::int64_t added);

/// The start of a causal decoder's forward: the token embeddings with the embed site's prompt
/// vectors in front (first pass only; their count is kept in the cache), the key mask over cached
/// and new positions, and each new position's index (from the mask, or from in.position_ids
/// when given), counted after `prefix` learned key/value positions as transformers does.
struct DecoderInputs {
  at::Tensor x, key_mask, positions;
  std::int64_t prompt = 0;  ///< prompt positions prepended in this pass
};
DecoderInputs decoder_inputs(at::Tensor embeddings, const ForwardInput& in, SiteHooks* embed_site,
                             KVCache* cache, std::int64_t prefix);

/// The rows' last tokens, found as transformers' *ForSequenceClassification decoders find them:
/// the position before the first `pad_id` in input_ids, modulo seq (so an unpadded or left-padded
/// row gives its last position); without a pad id, the last position whose mask is 1. [batch].
at::Tensor last_token_index(const at::Tensor& input_ids, const at::Tensor& mask,
                            std::int64_t pad_id);

/// The outputs of a causal decoder from its final hidden states x [batch, prompt + seq, d]:
/// hidden (without the prompt positions unless the caller asked for them) and the head's logits,
/// per position for a language model or on each row's last token for a "score" classifier.
ForwardOutput decoder_outputs(const at::Tensor& x, const ForwardInput& in, std::int64_t prompt,
                              const ModelConfig& config, LinearImpl& head);

/// The batch rows `hook` serves under the site's per-row routing; undefined when it serves every
/// row (no routing, or a hook the routing does not name). `x` is the hook's input, whose first
/// dimension must be the routed batch.
at::Tensor routed_rows(const SiteHooks& site, const Hook* hook, const at::Tensor& x);

/// Runs a sublayer site's transforms on `out`, reading the sublayer input `in`.
inline at::Tensor tap(SiteHooks* site, at::Tensor out, const at::Tensor& in) {
  if (!site || !site->active) return out;
  for (const auto& t : site->transforms) {
    const auto rows = routed_rows(*site, t.get(), out);
    if (!rows.defined())
      out = t->transform(out, in);
    else if (rows.numel() > 0)
      out = out.index_copy(0, rows,
                           t->transform(out.index_select(0, rows), in.index_select(0, rows)));
  }
  return out;
}

/// The step after a sublayer: `residual` + `out` (then `norm`, in a post-norm family), with the
/// site's residual transforms in between (AdapterHub's bottleneck adapters), which may close the
/// step themselves (never a routed one: AdapterSet::route refuses them).
inline at::Tensor residual_step(SiteHooks* site, const at::Tensor& out, const at::Tensor& residual,
                                const ResidualTransform::Norm* norm = nullptr) {
  if (!site || !site->active || site->residual.empty())
    return norm ? (*norm)(residual + out) : residual + out;
  auto h = out;
  for (const auto& r : site->residual) {
    const auto rows = routed_rows(*site, r.get(), h);
    if (!rows.defined())
      h = r->transform(h, residual, norm);
    else if (rows.numel() > 0)
      h = h.index_copy(0, rows,
                       r->transform(h.index_select(0, rows), residual.index_select(0, rows), norm));
  }
  if (site->residual.back()->closes()) return h;
  return norm ? (*norm)(residual + h) : residual + h;
}

/// The activation sites of one layer, consulted by the family's forward.
struct LayerTaps {
  SiteHooks *attn_in = nullptr, *attn_kv = nullptr, *attn_out = nullptr;
  SiteHooks *ffn_in = nullptr, *ffn_act = nullptr, *ffn_out = nullptr;
};

/// The taps of layer `layer`, looked up by site name through `hooks`.
LayerTaps layer_taps(const std::function<SiteHooks*(const std::string&)>& hooks,
                     std::int64_t layer);

/// The attention projections every family has: q, k, v ([d] -> heads or kv heads x head_dim)
/// and o, as graft::Linear sites.
class AttentionImpl : public torch::nn::Module {
 public:
  AttentionImpl(const ModelConfig& c, bool qkv_bias, bool o_bias);
  Linear q{nullptr}, k{nullptr}, v{nullptr}, o{nullptr};
};
TORCH_MODULE(Attention);

/// The feed-forward projections: up and down, and gate when `gated` (SwiGLU).
class FfnImpl : public torch::nn::Module {
 public:
  FfnImpl(const ModelConfig& c, bool gated, bool bias);
  Linear gate{nullptr}, up{nullptr}, down{nullptr};
};
TORCH_MODULE(Ffn);

/// Activation by Hugging Face name: silu, gelu (erf), gelu_new / gelu_pytorch_tanh (tanh), relu.
at::Tensor activate(const at::Tensor& x, const std::string& name);
/// Whether activate() knows `name` (checked when a configuration is read).
bool is_activation(const std::string& name);

/// The sites every transformer layer has. `gated` adds ffn.gate; `biases` adds a bias.* site per
/// linear projection; `pre_norm` places the norms before the sublayers.
std::vector<Site> layer_sites(const ModelConfig& c, std::int64_t layer, bool gated, bool biases);

/// A checkpoint naming rule: graft name <-> checkpoint name, "{L}" standing for a layer index.
using NameRule = std::pair<std::string, std::string>;

/// Renames checkpoint tensors to graft names by `rules`. A tensor no rule matches is an error
/// naming it, unless it matches one of `ignored` (patterns with "{L}" for a layer index, or a
/// prefix ending in "*": buffers
/// a checkpoint may carry that hold nothing graft computes with, such as rotary frequency caches
/// recomputed from the config); a file never holds something graft silently leaves out.
io::TensorMap rename_to_graft(const io::TensorMap& checkpoint, const std::vector<NameRule>& rules,
                              const std::vector<std::string>& ignored = {});
/// The inverse: graft names to checkpoint names.
io::TensorMap rename_from_graft(const io::TensorMap& tensors, const std::vector<NameRule>& rules);

/// Copies `tensors` (graft names) into the model's parameters, converting dtype and device.
/// Every parameter must be present with its exact shape, and every tensor must be a parameter
/// (a tied head may come as a copy of the embedding); `source` names the file in errors.
void load_parameters(torch::nn::Module& model, const io::TensorMap& tensors,
                     const std::string& source);

/// Fills every parameter with reproducible values from `seed`: weights N(0, std), norm gains 1,
/// biases 0. For tests and benchmarks.
void init_parameters(torch::nn::Module& model, std::uint64_t seed, double std = 0.02);

}  // namespace graft::models
