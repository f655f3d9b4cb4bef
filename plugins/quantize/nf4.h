// 4-bit NormalFloat (Dettmers et al. 2023): weights in blocks of 64, each scaled by its absolute
// maximum and rounded to the nearest of 16 levels placed at quantiles of a normal distribution.
// With double quantisation the per-block absmaxes are stored as int8 in blocks of 256 (after
// subtracting their mean), each block with one float scale.
#pragma once

#include <torch/torch.h>

namespace graft::plugins::quantize {

struct Nf4 {
  at::Tensor codes;     ///< uint8 [ceil(n / 2)]: two 4-bit codes per byte, first in the high half
  at::Tensor absmax;    ///< float [blocks] (without double quantisation)
  at::Tensor absmax_q;  ///< int8 [blocks] (with double quantisation)
  at::Tensor absmax_scale;  ///< float [ceil(blocks / 256)]
  double absmax_offset = 0;
  std::vector<std::int64_t> shape;
  std::int64_t numel = 0;

  static constexpr std::int64_t kBlock = 64, kAbsmaxBlock = 256;

  static Nf4 quantize(const at::Tensor& w, bool double_quant);
  /// The weight again, as float, on the codes' device.
  at::Tensor dequantize() const;
  /// Bytes held: codes, absmaxes and scales.
  std::int64_t bytes() const;
};

/// The 16 NF4 levels, ascending, from -1 to 1.
at::Tensor nf4_levels(const at::TensorOptions& options);

}  // namespace graft::plugins::quantize
