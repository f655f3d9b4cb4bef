// Building blocks with hand-written backward passes. Each computes exactly what the plain libtorch
// expression beside it computes (the same operations in the same order), but keeps for the
// backward pass only what the gradient needs, where autograd would keep every intermediate:
// training memory is mostly these saved activations.
#pragma once

#include <graft/model.h>
#include <torch/torch.h>

#include <memory>

namespace graft::models {

/// Rotary embedding of x [batch, heads, seq, dim] by the tables cos, sin [batch, 1, seq, dim/2]
/// (which take no gradient), in float32, returned in x's dtype. Saves nothing but the tables:
/// the gradient is the inverse rotation.
at::Tensor rotate(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin,
                  RopeStyle style);

/// softmax(masked_fill(q kᵀ / sqrt(dim), !allowed, lowest)) v for q [batch, heads, seq, dim],
/// k and v [batch, heads, keys, dim] and allowed [batch or 1, 1, seq, keys] (bool); scores and
/// softmax in float32. Saves q, k, v and the mask: the backward recomputes the probabilities (one
/// more q kᵀ product) instead of keeping [batch, heads, seq, keys] of them per layer.
at::Tensor attention_core(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                          const at::Tensor& allowed);

/// silu(gate) * up (SwiGLU), keeping gate and up for the backward rather than also silu(gate).
at::Tensor swiglu(const at::Tensor& gate, const at::Tensor& up);

/// x · effective_weight()ᵀ for a frozen `site` whose weight transforms are recomputable: keeps
/// the site (not the transformed weight) for the backward, which transforms the weight again.
at::Tensor linear_recomputing_weight(const at::Tensor& x, std::shared_ptr<LinearImpl> site);

}  // namespace graft::models
