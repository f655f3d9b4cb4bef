// Structure-aware intrinsic dimension fine-tuning (SAID, Aghajanyan et al. 2021): the selected
// weight matrices move only inside a random `dim`-dimensional subspace,
//   theta_i = theta_0,i + lambda_i (P theta_d)_i
// with one trainable scalar lambda_i per matrix and P a Fastfood transform of size LL (the next
// power of two at least the number of selected weights D):
//   P x = H G Pi H B pad(x) / (LL sigma_G),  taking the first D entries,
// H the Walsh-Hadamard transform (O(LL log LL), never a matrix), B random signs, Pi a random
// permutation, G Gaussian (sigma_G its root mean square). B, Pi and G are regenerated from `seed`
// and never stored: an adapter holds theta_d and the lambdas. theta_d starts at 0 (a no-op).
#include <graft/plugin.h>
#include <torch/torch.h>

#include <cmath>

namespace graft::plugins::intrinsic_said {
namespace {

// splitmix64: a small generator whose output is the same on every platform and libtorch version.
struct SplitMix {
  std::uint64_t s;
  std::uint64_t next() {
    std::uint64_t z = (s += 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
  }
  double uniform() { return (next() >> 11) * (1.0 / 9007199254740992.0); }  // [0, 1)
};

/// Walsh-Hadamard transform of x [LL] (LL a power of two), unnormalised, differentiable.
at::Tensor hadamard(at::Tensor x) {
  const auto n = x.size(0);
  for (std::int64_t h = 1; h < n; h *= 2) {
    auto v = x.view({-1, 2, h});
    auto a = v.select(1, 0), b = v.select(1, 1);
    x = torch::stack({a + b, a - b}, 1).reshape({n});
  }
  return x;
}

/// The Fastfood projection shared by every site: computes P theta_d once per forward pass.
class Fastfood : public torch::nn::Module {
 public:
  Fastfood(std::int64_t dim, std::int64_t D, std::uint64_t seed) : D_(D) {
    LL_ = 1;
    while (LL_ < std::max(D, dim)) LL_ *= 2;
    SplitMix rng{seed};
    std::vector<float> b(LL_), g(LL_);
    std::vector<std::int64_t> perm(LL_);
    for (auto& v : b) v = (rng.next() >> 63) ? 1.0f : -1.0f;
    for (std::int64_t i = 0; i < LL_; ++i) perm[i] = i;
    for (std::int64_t i = LL_ - 1; i > 0; --i)
      std::swap(perm[i], perm[static_cast<std::int64_t>(rng.uniform() * (i + 1))]);
    for (std::int64_t i = 0; i < LL_; i += 2) {  // Box-Muller
      const double u1 = 1.0 - rng.uniform(), u2 = rng.uniform();
      const double r = std::sqrt(-2.0 * std::log(u1)), t = 2 * M_PI * u2;
      g[i] = static_cast<float>(r * std::cos(t));
      if (i + 1 < LL_) g[i + 1] = static_cast<float>(r * std::sin(t));
    }
    B_ = register_buffer("B", torch::tensor(b));
    G_ = register_buffer("G", torch::tensor(g));
    Pi_ = register_buffer("Pi", torch::tensor(perm, torch::kLong));
    theta = register_parameter("theta_d", torch::zeros({dim}));
    norm_ = static_cast<double>(LL_) * std::sqrt(G_.pow(2).mean().item<double>());
  }

  /// P theta_d [D]: recomputed when `fresh` (the first site of a forward pass), or when theta_d
  /// changed or gradients are wanted again; otherwise the value of this pass.
  const at::Tensor& projection(bool fresh) {
    const bool grad = torch::GradMode::is_enabled();
    const auto version = static_cast<std::int64_t>(theta._version());
    if (fresh || !current_.defined() || version != version_ || grad != grad_) {
      auto x = torch::zeros({LL_}, theta.options());
      x = torch::cat({theta, x.narrow(0, theta.size(0), LL_ - theta.size(0))}) * B_;
      x = hadamard(x).index_select(0, Pi_) * G_;
      current_ = (hadamard(x) / norm_).narrow(0, 0, D_);
      version_ = version, grad_ = grad;
    }
    return current_;
  }
  std::int64_t LL() const { return LL_; }

  at::Tensor theta;

 private:
  std::int64_t D_, LL_;
  double norm_ = 1;
  at::Tensor B_, G_, Pi_, current_;
  std::int64_t version_ = -1;
  bool grad_ = false;
};

class SaidWeight : public WeightTransform {
 public:
  SaidWeight(std::shared_ptr<Fastfood> p, bool first, std::int64_t offset)
      : p_(std::move(p)), first_(first), offset_(offset) {
    lambda = register_parameter("said_lambda", torch::ones({1}));
  }
  at::Tensor transform(const at::Tensor& weight, const LinearImpl& site) override {
    // The first selected site is met first in every forward pass: it recomputes P theta_d.
    const auto& proj = p_->projection(first_ && torch::GradMode::is_enabled());
    auto delta = proj.narrow(0, offset_, site.out_features * site.in_features)
                     .view({site.out_features, site.in_features});
    return weight + (lambda * delta).to(weight.dtype());
  }
  bool mergeable() const override { return true; }
  at::Tensor lambda;

 private:
  std::shared_ptr<Fastfood> p_;
  bool first_;
  std::int64_t offset_;
};

class Said : public HookMethod {
 public:
  explicit Said(const Params& p) : where_(p) {
    check_method_keys(p, {"dim", "seed"});
    dim_ = p.get_positive_int("dim", 1000);
    seed_ = static_cast<std::uint64_t>(p.get_int("seed", 0));
    selection_ = Selection::from_params(p, {"all-linear"});
  }
  std::string name() const override { return "intrinsic_said"; }
  nlohmann::json config() const override {
    nlohmann::json j = {{"dim", dim_}, {"seed", seed_}};
    j.update(selection_.to_json());
    return j;
  }

  void attach(Model& model) override {
    auto sites = select_sites(model, selection_, name());
    std::int64_t D = 0;
    for (const auto& s : sites) {
      if (!Model::is_linear_point(s.point))
        throw Error("intrinsic_said: site '" + s.name + "' (point " + s.point +
                    ") is not a linear projection");
      D += s.in_features * s.out_features;
    }
    if (dim_ > D)
      where_.at("dim").fail("intrinsic_said: dim " + std::to_string(dim_) + " is larger than the " +
                            std::to_string(D) + " weights it would move; use at most that");
    proj_ = std::make_shared<Fastfood>(dim_, D, seed_);
    proj_->to(model.parameters().front().device());
    std::int64_t offset = 0;
    for (const auto& s : sites) {
      add_hook(model, s.name, std::make_shared<SaidWeight>(proj_, offset == 0, offset));
      offset += s.in_features * s.out_features;
    }
  }
  void detach(Model& model) override {
    HookMethod::detach(model);
    proj_.reset();
  }
  std::vector<std::pair<std::string, at::Tensor>> trainable_parameters() override {
    auto out = HookMethod::trainable_parameters();
    out.emplace_back("theta_d", attached().theta);
    return out;
  }
  io::TensorMap state() override {
    auto out = HookMethod::state();
    out["theta_d"] = attached().theta;
    return out;
  }
  void load_state(const io::TensorMap& state, const std::string& source) override {
    auto own = state;
    auto it = own.find("theta_d");
    if (it == own.end()) throw FileError(source, "intrinsic_said: missing tensor 'theta_d'");
    if (it->second.sizes() != attached().theta.sizes())
      throw FileError(source, "intrinsic_said: 'theta_d' has shape " +
                                  c10::str(it->second.sizes()) + " but dim is " +
                                  std::to_string(dim_));
    {
      torch::NoGradGuard no_grad;
      attached().theta.copy_(it->second);
    }
    own.erase(it);
    HookMethod::load_state(own, source);
  }

 private:
  Fastfood& attached() {
    if (!proj_) throw Error("intrinsic_said: not attached to a model");
    return *proj_;
  }
  Params where_;
  std::int64_t dim_ = 1000;
  std::uint64_t seed_ = 0;
  Selection selection_;
  std::shared_ptr<Fastfood> proj_;
};

void register_said(Registry& registry) {
  MethodInfo info;
  info.name = "intrinsic_said";
  info.version = "1.0.0";
  info.description = "fine-tuning in a random subspace (Fastfood projection, per-matrix scales)";
  info.mergeable = true;
  info.points = Model::linear_points();
  registry.add(
      info, [](const Params& p) -> std::unique_ptr<Method> { return std::make_unique<Said>(p); });
}

}  // namespace
}  // namespace graft::plugins::intrinsic_said

GRAFT_PLUGIN("intrinsic_said", "1.0.0", graft::plugins::intrinsic_said::register_said)
