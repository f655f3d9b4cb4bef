// Compacter (Mahabadi et al. 2021): bottleneck adapters whose down and up projections are
// parameterised hypercomplex multiplication (PHM) layers
//   W = sum_{i=1..n} A_i (x) B_i,   A_i: n x n rule matrices shared by every PHM layer of the
//                                   model,  B_i = s_i t_i^T (rank one, one per layer)
// applied without forming W. `compacter` sits after attention and the feed-forward, `compacter++`
// after the feed-forward only; both reduction 32, gelu, n = 4. Widths must be divisible by n.
#include <graft/plugin.h>

#include "../bottleneck/adapter.h"

namespace graft::plugins::adapters {
namespace {

/// One PHM layer in -> out: s [n, in/n], t [n, out/n]; rules [n, n, n] shared (A_i = rules[i]).
struct Phm {
  at::Tensor s, t, bias;
  // x [..., in] -> [..., out]. With X = x viewed [..., n, in/n]:
  //   y[c, e] = sum_i t_i[e] sum_a A_i[a, c] (X[a, :] . s_i)
  at::Tensor apply(const at::Tensor& x, const at::Tensor& rules) const {
    const auto n = rules.size(0);
    auto X = x.unflatten(-1, {n, x.size(-1) / n});                         // [..., a, b]
    auto u = torch::matmul(X, s.to(x.dtype()).t());                        // [..., a, i]
    auto v = torch::einsum("...ai,iac->...ci", {u, rules.to(x.dtype())});  // [..., c, i]
    auto y = torch::matmul(v, t.to(x.dtype()));                            // [..., c, e]
    return y.flatten(-2) + bias.to(x.dtype());
  }
};

class CompacterAdapter : public Adapter {
 public:
  CompacterAdapter(const AdapterConfig& c, std::int64_t d, std::int64_t k, std::int64_t n,
                   at::Tensor rules)
      : Adapter(c, d, k, false), rules_(std::move(rules)) {
    down_.s = register_parameter("down_s", torch::randn({n, d / n}) / std::sqrt(double(d)));
    down_.t = register_parameter("down_t", torch::randn({n, k / n}));
    down_.bias = register_parameter("down_bias", torch::zeros({k}));
    up_.s = register_parameter("up_s", torch::randn({n, k / n}) / std::sqrt(double(k)));
    up_.t = register_parameter("up_t", torch::zeros({n, d / n}));  // W_up = 0: a no-op at first
    up_.bias = register_parameter("up_bias", torch::zeros({d}));
  }

 protected:
  at::Tensor down(const at::Tensor& h) override { return down_.apply(h, rules_); }
  at::Tensor up(const at::Tensor& h) override { return up_.apply(h, rules_); }

 private:
  Phm down_, up_;
  at::Tensor rules_;
};

class Compacter : public HookMethod {
 public:
  Compacter(std::string name, AdapterConfig c, std::int64_t n)
      : name_(std::move(name)), c_(std::move(c)), n_(n) {}
  std::string name() const override { return name_; }
  nlohmann::json config() const override {
    auto j = c_.to_json();
    j["n"] = n_;
    return j;
  }

  void attach(Model& model) override {
    const auto sites = select_sites(model, c_.selection, name());
    for (const auto& site : sites) {  // every width checked before anything is allocated
      if (site.point != "attn.out" && site.point != "ffn.out")
        throw Error(name() + ": site '" + site.name + "' (point " + site.point +
                    ") is not a sublayer output; compacter sits at attn.out or ffn.out");
      const auto d = site.out_features, k = c_.width(site, name());
      if (d % n_ != 0 || k % n_ != 0)
        throw Error(name() + ": site '" + site.name + "': its width " + std::to_string(d) +
                    " and bottleneck width " + std::to_string(k) + " (" + std::to_string(d) +
                    " / reduction_factor) must both be divisible by n = " + std::to_string(n_) +
                    "; change reduction_factor or n");
    }
    if (!rules_.defined()) {
      // A_i ~ N(0, 1/n): with s ~ N(0, 1/d) and t ~ N(0, 1), W's entries have variance 1/d.
      torch::NoGradGuard no_grad;
      rules_ = (torch::randn({n_, n_, n_}) / std::sqrt(double(n_)))
                   .to(model.parameters().front().device())
                   .requires_grad_(true);
    }
    for (const auto& site : sites)
      add_hook(model, site.name,
               std::make_shared<CompacterAdapter>(c_, site.out_features, c_.width(site, name()), n_,
                                                  rules_));
  }
  // The shared rule matrices are the method's, named "phm_rule", held once.
  std::vector<std::pair<std::string, at::Tensor>> trainable_parameters() override {
    auto out = HookMethod::trainable_parameters();
    if (rules_.defined()) out.emplace_back("phm_rule", rules_);
    return out;
  }
  io::TensorMap state() override {
    auto out = HookMethod::state();
    if (rules_.defined()) out["phm_rule"] = rules_;
    return out;
  }
  void load_state(const io::TensorMap& state, const std::string& source) override {
    auto own = state;
    auto it = own.find("phm_rule");
    if (it == own.end()) throw FileError(source, name() + ": missing tensor 'phm_rule'");
    if (!rules_.defined()) throw Error(name() + ": not attached to a model");
    if (it->second.sizes() != rules_.sizes())
      throw FileError(source, name() + ": 'phm_rule' has shape " + c10::str(it->second.sizes()) +
                                  " but n = " + std::to_string(n_) + " needs " +
                                  c10::str(rules_.sizes()));
    {
      torch::NoGradGuard no_grad;
      rules_.copy_(it->second);
    }
    own.erase(it);
    HookMethod::load_state(own, source);
  }

 private:
  std::string name_;
  AdapterConfig c_;
  std::int64_t n_;
  at::Tensor rules_;
};

void add(Registry& registry, const std::string& name, const std::string& description,
         std::vector<std::string> targets) {
  AdapterConfig preset;
  preset.reduction_factor = 32;
  preset.non_linearity = "gelu";
  MethodInfo info;
  info.name = name;
  info.version = "1.0.0";
  info.description = description;
  info.points = {"attn.out", "ffn.out"};
  registry.add(info, [=](const Params& p) -> std::unique_ptr<Method> {
    auto c = AdapterConfig::from_params(p, preset, targets, {"n"});
    const auto n = p.get_positive_int("n", 4);
    return std::make_unique<Compacter>(name, c, n);
  });
}

void register_compacter(Registry& registry) {
  add(registry, "compacter",
      "PHM (Kronecker) adapters after attention and feed-forward, shared rules",
      {"attn.out", "ffn.out"});
  add(registry, "compacter++", "compacter after the feed-forward only", {"ffn.out"});
}

}  // namespace
}  // namespace graft::plugins::adapters

GRAFT_PLUGIN("compacter", "1.0.0", graft::plugins::adapters::register_compacter)
