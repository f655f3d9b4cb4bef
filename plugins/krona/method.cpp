// KronA (Edalati et al. 2022): delta W = s * (A (x) B) on linear sites, A: a1 x a2, B: b1 x b2,
// a1 b1 = out, a2 b2 = in. Applied without forming the Kronecker product: with x viewed as
// X [a2, b2], (A (x) B) x = vec(A X B^T). A starts Kaiming-uniform, B at zero (a no-op at first).
// Factors are the divisors nearest the square roots of out and in unless `a_shape` is given.
#include <graft/plugin.h>
#include <torch/torch.h>

#include <cmath>

namespace graft::plugins::krona {
namespace {

/// The divisor of n nearest sqrt(n) from below.
std::int64_t near_sqrt_divisor(std::int64_t n) {
  auto f = static_cast<std::int64_t>(std::sqrt(static_cast<double>(n)));
  while (f > 1 && n % f != 0) --f;
  return std::max<std::int64_t>(f, 1);
}

class KronaDelta : public LinearDelta {
 public:
  KronaDelta(std::int64_t a1, std::int64_t a2, std::int64_t b1, std::int64_t b2, double s)
      : scaling(s) {
    A = register_parameter("krona_A", torch::empty({a1, a2}));
    B = register_parameter("krona_B", torch::zeros({b1, b2}));
    torch::NoGradGuard no_grad;
    const double bound = 1.0 / std::sqrt(static_cast<double>(a2));
    A.uniform_(-bound, bound);
  }
  at::Tensor delta(const at::Tensor& x, const LinearImpl&) override {
    auto X = x.unflatten(-1, {A.size(1), B.size(1)});  // [..., a2, b2]
    auto Y =
        torch::matmul(torch::matmul(A.to(x.dtype()), X), B.to(x.dtype()).t());  // [..., a1, b1]
    return Y.flatten(-2) * scaling;
  }
  at::Tensor delta_weight(const LinearImpl&) override { return torch::kron(A, B) * scaling; }

  at::Tensor A, B;
  double scaling;
};

class Krona : public HookMethod {
 public:
  explicit Krona(const Params& p) : where_(p) {
    check_method_keys(p, {"a_shape", "scaling"});
    selection_ = Selection::from_params(p, {"attn.q", "attn.v"});
    scaling_ = p.get_double("scaling", 1.0);
    if (p.has("a_shape")) {
      const auto& list = p.at("a_shape");
      if (list.kind() != Params::Kind::list || list.items().size() != 2)
        list.fail("expected [a1, a2]: the rows and columns of A");
      a_shape_ = {list.items()[0].as_positive_int(), list.items()[1].as_positive_int()};
    }
  }
  std::string name() const override { return "krona"; }
  nlohmann::json config() const override {
    nlohmann::json j = {{"scaling", scaling_}};
    if (!a_shape_.empty()) j["a_shape"] = a_shape_;
    j.update(selection_.to_json());
    return j;
  }

  void attach(Model& model) override {
    for (const auto& site : select_sites(model, selection_, name())) {
      if (!Model::is_linear_point(site.point))
        throw Error("krona: site '" + site.name + "' (point " + site.point +
                    ") is not a linear projection");
      const auto out = site.out_features, in = site.in_features;
      auto a1 = a_shape_.empty() ? near_sqrt_divisor(out) : a_shape_[0];
      auto a2 = a_shape_.empty() ? near_sqrt_divisor(in) : a_shape_[1];
      if (out % a1 != 0 || in % a2 != 0)
        where_.at("a_shape").fail("krona: site '" + site.name + "' is " + std::to_string(out) +
                                  " x " + std::to_string(in) + "; A's shape must divide it");
      auto hook = std::make_shared<KronaDelta>(a1, a2, out / a1, in / a2, scaling_);
      hook->to(model.linear(site.name)->weight.device());
      add_hook(model, site.name, hook);
    }
  }

 private:
  Params where_;
  Selection selection_;
  double scaling_ = 1.0;
  std::vector<std::int64_t> a_shape_;
};

void register_krona(Registry& registry) {
  MethodInfo info;
  info.name = "krona";
  info.version = "1.0.0";
  info.description = "Kronecker-product updates s (A (x) B) on linear projections";
  info.mergeable = true;
  info.points = Model::linear_points();
  registry.add(
      info, [](const Params& p) -> std::unique_ptr<Method> { return std::make_unique<Krona>(p); });
}

}  // namespace
}  // namespace graft::plugins::krona

GRAFT_PLUGIN("krona", "1.0.0", graft::plugins::krona::register_krona)
