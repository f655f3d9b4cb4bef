// Hooks: how a PEFT method changes what happens at an injection site. A plugin creates hook
// modules (holding its trainable parameters) and attaches them to sites; the model's forward
// consults them. A site with nothing attached costs one flag check.
//
// Composition at one site, in this fixed order:
//   linear sites:    weight transforms (in attach order) -> input scales -> y = x W^T + b
//                    -> + every linear delta (summed) -> output scales
//   sublayer sites:  (attn.out, ffn.out, attn.in, ffn.in, ffn.act) transforms in attach order
//   residual step:   (attn.out, ffn.out) after the transforms, residual transforms in attach
//                    order, then the residual add and post-norm (unless the last one closes it)
//   attn.kv:         key/value prefixes concatenated in attach order, before the tokens' keys
//   embed:           prompt vectors concatenated in attach order, before the tokens
// Under per-row routing (RowRouting) a routed hook acts on its rows only; the others pass
// through it unchanged.
#pragma once

#include <ATen/core/Tensor.h>
#include <torch/nn/module.h>

#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <unordered_map>
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

/// Takes over the step after a sublayer (attn.out, ffn.out) where the model adds the residual and,
/// in a post-norm family (BERT), normalises: AdapterHub's bottleneck adapters sit there. Receives
/// the sublayer's output `out` [batch, seq, d] (after the site's sublayer transforms), the
/// residual stream `residual` it is added to (the sublayer's input before any pre-norm), and the
/// layer's post-norm (null in a pre-norm family); returns the output to pass on. Several at one
/// site run in attach order, each reading the previous one's output (AdapterHub's Stack). After
/// the last one the model adds the residual and applies its post-norm, unless that one closes()
/// the step itself, in which case its output is the layer's output as it stands.
class ResidualTransform : public Hook {
 public:
  using Norm = std::function<at::Tensor(const at::Tensor&)>;
  virtual at::Tensor transform(const at::Tensor& out, const at::Tensor& residual,
                               const Norm* norm) = 0;
  virtual bool closes() const { return false; }
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
  /// Whether prefix() has one head per query head ([batch, heads, ...]: AdapterHub's prefixes,
  /// concatenated after the keys are repeated for grouped-query attention) rather than one per
  /// key/value head.
  virtual bool query_heads() const { return false; }
  /// Whether the real tokens' positions start after this prefix (peft's past_key_values), or stay
  /// 0..S-1 (AdapterHub, which concatenates inside the attention).
  virtual bool shifts_positions() const { return true; }
};

/// Prepends learned vectors to the token embeddings (soft prompts). Returns [batch, prompt, d].
/// The mask is extended with ones and the outputs at these positions are dropped.
class EmbeddingExtension : public Hook {
 public:
  virtual at::Tensor prompt(std::int64_t batch) = 0;
  /// Where the prompt goes: before the position embeddings and the embedding norm, the virtual
  /// tokens taking the first positions (peft), or after the whole embedding module, the real
  /// tokens keeping positions 0..S-1 (AdapterHub; families with an embedding module of their
  /// own: BERT).
  virtual bool after_embedding() const { return false; }
};

/// Per-row routing of a batch (graft::AdapterSet::route, peft's adapter_names): the batch rows
/// each routed hook serves. A hook not listed serves every row. Only hooks that act row by row
/// may be routed: linear deltas and scales, sublayer transforms and residual transforms that do
/// not close the step; each runs once, on its rows gathered together.
struct RowRouting {
  std::int64_t batch = 0;                            ///< the rows the routes name
  std::unordered_map<const Hook*, at::Tensor> rows;  ///< int64 row indices (maybe none)
  /// The rows `hook` serves; undefined when it serves every row.
  at::Tensor rows_of(const Hook* hook) const {
    const auto it = rows.find(hook);
    return it == rows.end() ? at::Tensor() : it->second;
  }
};

/// Everything attached at one site, by kind, in attach order.
struct SiteHooks {
  std::vector<std::shared_ptr<WeightTransform>> weight_transforms;
  std::vector<std::shared_ptr<LinearDelta>> deltas;
  std::vector<std::shared_ptr<LinearScale>> scales;
  std::vector<std::shared_ptr<SublayerTransform>> transforms;
  std::vector<std::shared_ptr<ResidualTransform>> residual;
  std::vector<std::shared_ptr<KvExtension>> kv;
  std::vector<std::shared_ptr<EmbeddingExtension>> embeddings;
  std::vector<std::string> owners;  ///< methods that attached here, in order
  std::string exclusive_owner;      ///< the method holding an exclusive claim, if any
  bool active = false;              ///< anything attached: the one flag the forward checks
  std::shared_ptr<const RowRouting> routing;  ///< set while a batch is routed per row
};

}  // namespace graft
