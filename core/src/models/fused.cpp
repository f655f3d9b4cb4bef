#include "models/fused.h"

#include <cmath>
#include <limits>

namespace graft::models {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

// x rotated by the angles whose cosines and sines are c and s, in float32.
at::Tensor rotated(const at::Tensor& x, const at::Tensor& c, const at::Tensor& s, RopeStyle style) {
  const auto half = x.size(-1) / 2;
  auto xf = x.to(torch::kFloat);
  if (style == RopeStyle::interleaved) {
    auto pairs = xf.unflatten(-1, {half, 2});
    auto x0 = pairs.select(-1, 0), x1 = pairs.select(-1, 1);
    return torch::stack({x0 * c - x1 * s, x0 * s + x1 * c}, -1).flatten(-2);
  }
  auto x0 = xf.narrow(-1, 0, half), x1 = xf.narrow(-1, half, half);
  return torch::cat({x0 * c - x1 * s, x1 * c + x0 * s}, -1);
}

class Rotate : public torch::autograd::Function<Rotate> {
 public:
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& cos,
                            const at::Tensor& sin, std::int64_t style) {
    ctx->save_for_backward({cos, sin});
    ctx->saved_data["style"] = style;
    return rotated(x, cos, sin, static_cast<RopeStyle>(style)).to(x.scalar_type());
  }
  static variable_list backward(AutogradContext* ctx, variable_list grad) {
    const auto saved = ctx->get_saved_variables();
    const auto style = static_cast<RopeStyle>(ctx->saved_data["style"].toInt());
    // A rotation's transpose is the rotation by the opposite angle.
    auto g = rotated(grad[0], saved[0], -saved[1], style).to(grad[0].scalar_type());
    return {g, at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

// The attention probabilities, computed the same way in the forward and in the backward.
at::Tensor probabilities(const at::Tensor& q, const at::Tensor& k, const at::Tensor& allowed) {
  auto scores = torch::matmul(q, k.transpose(-2, -1)).to(torch::kFloat);
  scores.div_(std::sqrt(static_cast<double>(q.size(-1))));
  scores.masked_fill_(allowed.logical_not(), std::numeric_limits<float>::lowest());
  return torch::softmax(scores, -1);
}

class AttentionCore : public torch::autograd::Function<AttentionCore> {
 public:
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& q, const at::Tensor& k,
                            const at::Tensor& v, const at::Tensor& allowed) {
    ctx->save_for_backward({q, k, v, allowed});
    return torch::matmul(probabilities(q, k, allowed).to(v.scalar_type()), v);
  }
  static variable_list backward(AutogradContext* ctx, variable_list grad) {
    const auto saved = ctx->get_saved_variables();
    const auto &q = saved[0], &k = saved[1], &v = saved[2], &allowed = saved[3];
    const auto& dout = grad[0];
    auto p = probabilities(q, k, allowed);
    auto dv = torch::matmul(p.to(v.scalar_type()).transpose(-2, -1), dout);
    // Softmax backward: ds = p * (dp - sum(p * dp)); masked scores were constants.
    auto dp = torch::matmul(dout, v.transpose(-2, -1)).to(torch::kFloat);
    auto ds = dp.sub_((dp * p).sum(-1, true)).mul_(p);
    ds.masked_fill_(allowed.logical_not(), 0).div_(std::sqrt(static_cast<double>(q.size(-1))));
    ds = ds.to(q.scalar_type());
    auto dq = torch::matmul(ds, k);
    auto dk = torch::matmul(ds.transpose(-2, -1), q);
    return {dq, dk, dv, at::Tensor()};
  }
};

class SwiGlu : public torch::autograd::Function<SwiGlu> {
 public:
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& gate, const at::Tensor& up) {
    ctx->save_for_backward({gate, up});
    return torch::silu(gate) * up;
  }
  static variable_list backward(AutogradContext* ctx, variable_list grad) {
    const auto saved = ctx->get_saved_variables();
    const auto &gate = saved[0], &up = saved[1];
    const auto& g = grad[0];
    auto sig = torch::sigmoid(gate);
    auto dup = g * (gate * sig);
    // d silu(x) / dx = sigmoid(x) (1 + x (1 - sigmoid(x)))
    auto dgate = g * up * sig * (1 + gate * (1 - sig));
    return {dgate, dup};
  }
};

// The site a backward pass transforms the weight of again, kept alive until then.
struct SiteRef : torch::CustomClassHolder {
  explicit SiteRef(std::shared_ptr<LinearImpl> s) : site(std::move(s)) {}
  std::shared_ptr<LinearImpl> site;
};

class RecomputedWeightLinear : public torch::autograd::Function<RecomputedWeightLinear> {
 public:
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x,
                            std::shared_ptr<LinearImpl> site) {
    auto y = torch::linear(x, site->effective_weight());
    ctx->saved_data["site"] = at::IValue::make_capsule(c10::make_intrusive<SiteRef>(site));
    return y;
  }
  static variable_list backward(AutogradContext* ctx, variable_list grad) {
    auto ref = c10::static_intrusive_pointer_cast<SiteRef>(ctx->saved_data["site"].toCapsule());
    const auto w = ref->site->effective_weight();
    return {torch::matmul(grad[0], w.to(grad[0].scalar_type())), at::Tensor()};
  }
};

}  // namespace

at::Tensor linear_recomputing_weight(const at::Tensor& x, std::shared_ptr<LinearImpl> site) {
  return RecomputedWeightLinear::apply(x, std::move(site));
}

at::Tensor rotate(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin,
                  RopeStyle style) {
  return Rotate::apply(x, cos, sin, static_cast<std::int64_t>(style));
}

at::Tensor attention_core(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                          const at::Tensor& allowed) {
  return AttentionCore::apply(q, k, v, allowed);
}

at::Tensor swiglu(const at::Tensor& gate, const at::Tensor& up) { return SwiGlu::apply(gate, up); }

}  // namespace graft::models
