// Hooks: how a PEFT method changes what happens at an injection site. A plugin creates hook
// modules (holding its trainable parameters) and attaches them to sites; the model's forward
// consults them. A site with nothing attached costs one flag check.
//
// Composition at one site, in this fixed order:
//   linear sites:    weight transforms (in attach order) -> input scales -> y = x W^T + b
//                    -> + every linear delta (summed) -> output scales
//   sublayer sites:  (attn.out, ffn.out, attn.in, ffn.in, ffn.act) transforms in attach order
//   attn.kv:         key/value prefixes concatenated in attach order, before the tokens' keys
//   embed:           prompt vectors concatenated in attach order, before the tokens
#pragma once

#include <ATen/core/Tensor.h>
#include <torch/nn/module.h>

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

namespace graft {

class LinearImpl;

/// The base of every hook: a torch module whose parameters are the method's parameters at
/// one site. Names of parameters are the names used in saved adapter files
/// ("layers.3.attn.q" + "." + parameter name).
class Hook : public torch::nn::Module {
 public:
  ~Hook() override = default;
};

/// Replaces how a linear site's weight is obtained (dequantising a compressed base, rescaling
/// its rows).
/// Receives the weight so far ([out, in]) and returns the weight to use.
class WeightTransform : public Hook {
 public:
  virtual at::Tensor transform(const at::Tensor& weight, const LinearImpl& site) = 0;
  /// Whether transform() may be folded into the stored weight.
  virtual bool mergeable() const { return false; }
  /// Whether transform() trains nothing and may simply run again in the backward pass. When every
  /// transform at a frozen site says so, the site keeps its input for the backward rather than
  /// the transformed weight (a quantised base stays quantised between forward and backward).
  virtual bool recomputable() const { return false; }
};

/// Adds to a linear site's output: y += delta(x). x: [..., in] -> [..., out] (low-rank or
/// Kronecker updates).
class LinearDelta : public Hook {
 public:
  virtual at::Tensor delta(const at::Tensor& x, const LinearImpl& site) = 0;
  /// The delta as a weight matrix [out, in] (and optional bias [out]) for merging; an undefined
  /// tensor means the delta cannot be merged.
  virtual at::Tensor delta_weight(const LinearImpl& /*site*/) { return {}; }
  virtual at::Tensor delta_bias(const LinearImpl& /*site*/) { return {}; }
};

/// Scales a linear site's input or output elementwise (learned rescaling vectors).
class LinearScale : public Hook {
 public:
  enum class Side { input, output };
  virtual Side side() const = 0;
  /// The scale vector: [in] for the input side, [out] for the output side.
  virtual at::Tensor scale() = 0;
};

/// Maps a sublayer's output, optionally reading the sublayer's input (modules placed after a
/// sublayer or beside it). out: [batch, seq, width]; in: the sublayer's (normalised) input, [batch,
/// seq, d].
class SublayerTransform : public Hook {
 public:
  virtual at::Tensor transform(const at::Tensor& out, const at::Tensor& in) = 0;
};

/// Prepends learned keys and values to a layer's attention (soft prefixes). Receives the
/// attention's (normalised) input [batch, seq, d] of the first pass (a gate may read it) and
/// returns [batch, kv_heads, prefix, head_dim] each; every query may attend to them. With a
/// cache, they are computed once and cached. As in transformers with a filled cache, the
/// positions of the real tokens start after the longest prefix.
class KvExtension : public Hook {
 public:
  virtual std::pair<at::Tensor, at::Tensor> prefix(const at::Tensor& input) = 0;
  /// How many positions prefix() returns.
  virtual std::int64_t length() const = 0;
};

/// Prepends learned vectors to the token embeddings (soft prompts). Returns [batch, prompt, d].
/// The mask is extended with ones and the outputs at these positions are dropped.
class EmbeddingExtension : public Hook {
 public:
  virtual at::Tensor prompt(std::int64_t batch) = 0;
};

/// Everything attached at one site, by kind, in attach order.
struct SiteHooks {
  std::vector<std::shared_ptr<WeightTransform>> weight_transforms;
  std::vector<std::shared_ptr<LinearDelta>> deltas;
  std::vector<std::shared_ptr<LinearScale>> scales;
  std::vector<std::shared_ptr<SublayerTransform>> transforms;
  std::vector<std::shared_ptr<KvExtension>> kv;
  std::vector<std::shared_ptr<EmbeddingExtension>> embeddings;
  std::vector<std::string> owners;  ///< methods that attached here, in order
  std::string exclusive_owner;      ///< the method holding an exclusive claim, if any
  bool active = false;              ///< anything attached: the one flag the forward checks
};

}  // namespace graft
