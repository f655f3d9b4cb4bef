#include "nf4.h"

namespace graft::plugins::quantize {

at::Tensor nf4_levels(const at::TensorOptions& options) {
  // The NF4 data type's levels as published with QLoRA (Dettmers et al. 2023, appendix E).
  static const std::vector<float> levels = {
      -1.0f,          -0.6961928010f, -0.5250730515f, -0.3949174881f,
      -0.2844413817f, -0.1847734302f, -0.0910500363f, 0.0f,
      0.0795802996f,  0.1609302014f,  0.2461123019f,  0.3379152417f,
      0.4407098293f,  0.5626170039f,  0.7229568362f,  1.0f};
  return torch::tensor(levels, options.dtype(torch::kFloat));
}

Nf4 Nf4::quantize(const at::Tensor& w, bool double_quant) {
  torch::NoGradGuard no_grad;
  Nf4 q;
  q.shape = w.sizes().vec();
  q.numel = w.numel();
  const auto blocks = (q.numel + kBlock - 1) / kBlock;
  auto flat = torch::zeros({blocks * kBlock}, w.options().dtype(torch::kFloat));
  flat.narrow(0, 0, q.numel).copy_(w.reshape({-1}));
  auto x = flat.view({blocks, kBlock});
  auto absmax = x.abs().amax(1);                           // [blocks]
  auto normed = x / absmax.clamp_min(1e-30).unsqueeze(1);  // in [-1, 1]
  auto levels = nf4_levels(w.options());
  // The nearest level: count the midpoints between levels below each value.
  auto midpoints = (levels.narrow(0, 0, 15) + levels.narrow(0, 1, 15)) / 2;
  auto idx = torch::bucketize(normed.reshape({-1}), midpoints);  // [blocks * 64], 0..15
  idx = idx.narrow(0, 0, q.numel);
  if (idx.size(0) % 2) idx = torch::cat({idx, torch::zeros({1}, idx.options())});
  auto pairs = idx.view({-1, 2}).to(torch::kUInt8);
  q.codes = (pairs.select(1, 0) * 16 + pairs.select(1, 1)).contiguous();
  if (!double_quant) {
    q.absmax = absmax.contiguous();
    return q;
  }
  q.absmax_offset = absmax.mean().item<double>();
  const auto groups = (blocks + kAbsmaxBlock - 1) / kAbsmaxBlock;
  auto centred = torch::zeros({groups * kAbsmaxBlock}, absmax.options());
  centred.narrow(0, 0, blocks).copy_(absmax - q.absmax_offset);
  auto g = centred.view({groups, kAbsmaxBlock});
  q.absmax_scale = g.abs().amax(1).clamp_min(1e-30).contiguous();  // [groups]
  q.absmax_q = (g / q.absmax_scale.unsqueeze(1) * 127)
                   .round()
                   .clamp(-127, 127)
                   .reshape({-1})
                   .narrow(0, 0, blocks)
                   .to(torch::kInt8)
                   .contiguous();
  return q;
}

at::Tensor Nf4::dequantize() const {
  const auto levels = nf4_levels(codes.options());
  auto hi = codes.to(torch::kLong).div(16, "floor"), lo = codes.to(torch::kLong).remainder(16);
  auto idx = torch::stack({hi, lo}, 1).reshape({-1}).narrow(0, 0, numel);
  at::Tensor scale = absmax;
  if (!scale.defined()) {
    const auto blocks = absmax_q.size(0);
    auto padded = torch::zeros({absmax_scale.size(0) * kAbsmaxBlock}, absmax_scale.options());
    padded.narrow(0, 0, blocks).copy_(absmax_q.to(torch::kFloat));
    scale = (padded.view({-1, kAbsmaxBlock}) / 127 * absmax_scale.unsqueeze(1))
                .reshape({-1})
                .narrow(0, 0, blocks) +
            absmax_offset;
  }
  auto per_element = scale.repeat_interleave(kBlock).narrow(0, 0, numel);
  return (levels.index_select(0, idx) * per_element).view(shape);
}

std::int64_t Nf4::bytes() const {
  std::int64_t n = codes.numel();
  if (absmax.defined()) n += absmax.numel() * 4;
  if (absmax_q.defined()) n += absmax_q.numel() + absmax_scale.numel() * 4 + 8;
  return n;
}

}  // namespace graft::plugins::quantize
