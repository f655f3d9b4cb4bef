// Numeric tolerances derived from the computation, never from what one machine printed.
//
// A float32 sum of n terms computed in any order is within gamma_n * S of the exact sum, S being
// the sum of the terms' magnitudes and gamma_n = n*u / (1 - n*u) with u = 2^-24 (Higham, Accuracy
// and Stability of Numerical Algorithms, 3.1). Two evaluations of one quantity that differ only in
// how they associate their sums (a merged weight against the unmerged product, another BLAS
// kernel, a key/value cache against recomputation) are therefore within 2 * gamma_n * S of each
// other. n is the longest chain of rounded operations that leads to a compared value, counted from
// the model's shapes; S is taken as the largest magnitude of the compared values, which the norms
// of every family keep of the order of the values inside the network.
//
// A merge that forgets its scaling, a delta left out or a row order mixed up moves the outputs by
// the size of the method's effect, orders of magnitude above these bounds: checks that use them
// also assert that the effect they guard is far larger than the bound.
#pragma once

#include <doctest/doctest.h>
#include <graft/model.h>
#include <torch/torch.h>

#include <algorithm>
#include <cstdint>

namespace graft::test {

/// float32's unit roundoff: every rounded operation is within u * |result| of the exact result.
inline constexpr double kUnit32 = 0x1p-24;

/// gamma_n = n*u / (1 - n*u): the relative bound of a sum (or dot product) of n float32 terms.
inline double gamma32(std::int64_t n) {
  const double nu = static_cast<double>(n) * kUnit32;
  return nu / (1.0 - nu);
}

/// The longest chain of rounded operations from the input ids to an output of one forward pass of
/// a model of `c` over `keys` key positions: per layer, the attention projections (d-long dot
/// products), the scores and their weighted sum (head_dim and `keys` terms), the output projection
/// (heads * head_dim), the feed-forward (d and intermediate), and a handful for norms, softmax,
/// activation and the residual; then the head (d).
inline std::int64_t forward_terms(const ModelConfig& c, std::int64_t keys) {
  const std::int64_t per_layer = c.hidden_size + c.head_dim + keys + c.num_heads * c.head_dim +
                                 c.hidden_size + c.intermediate_size + 16;
  return c.num_layers * per_layer + c.hidden_size + 8;
}

/// The largest magnitude in `t` (as a double), at least the smallest normal float so that a
/// tolerance is never zero.
inline double max_abs(const at::Tensor& t) {
  return std::max(t.detach().abs().max().item<double>(), 1.1754943508222875e-38);
}

/// How far two float32 evaluations of `reference` that sum the same terms in another order may
/// differ, after a chain of `terms` rounded operations: 2 * gamma_n * max|reference|.
inline double reorder_tolerance(const at::Tensor& reference, std::int64_t terms) {
  return 2.0 * gamma32(terms) * max_abs(reference);
}

/// reorder_tolerance() for the outputs of one forward pass of `model` over `keys` key positions.
inline double forward_tolerance(const Model& model, const at::Tensor& reference,
                                std::int64_t keys) {
  return reorder_tolerance(reference, forward_terms(model.config(), keys));
}

/// The largest elementwise difference of two tensors, in double.
inline double max_diff(const at::Tensor& a, const at::Tensor& b) {
  return (a.detach().to(torch::kDouble) - b.detach().to(torch::kDouble)).abs().max().item<double>();
}

}  // namespace graft::test

/// Checks that max|a - b| <= tol, printing the difference and the bound when it is not so.
#define GRAFT_CHECK_CLOSE(a, b, tol)                                                       \
  do {                                                                                     \
    const double graft_diff_ = ::graft::test::max_diff((a), (b));                          \
    const double graft_tol_ = (tol);                                                       \
    CHECK_MESSAGE(graft_diff_ <= graft_tol_,                                               \
                  "max |" #a " - " #b "| = " << graft_diff_ << " exceeds " << graft_tol_); \
  } while (0)
