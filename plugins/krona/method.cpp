// KronA (Edalati et al. 2022): delta W = s * (A ⊗ B) on linear sites, A: a1 x a2, B: b1 x b2,
// a1 b1 = out, a2 b2 = in. Applied without forming the Kronecker product: with x viewed as
// X [a2, b2], (A ⊗ B) x = vec(A X B^T). A starts Kaiming-uniform, B at zero (a no-op at first).
// Factors are the divisors nearest the square roots of out and in unless `a_shape` is given; with
// `r`, B (and with decompose_both, A) becomes a rank-r product where that is smaller, as in
// peft's LoKr.
#include <graft/plugin.h>

#include <cmath>

#include "krona.h"

namespace graft::plugins::krona {
namespace {

// Kaiming-uniform with a = sqrt(5) (torch's and peft's default): bound 1/sqrt(fan_in).
at::Tensor kaiming_uniform(std::int64_t rows, std::int64_t cols) {
  const double bound = 1.0 / std::sqrt(static_cast<double>(cols));
  return torch::empty({rows, cols}).uniform_(-bound, bound);
}

// Registers a factor's parameters under `name` ("krona_A" or "krona_A_a" + "krona_A_b").
Factor make_factor(torch::nn::Module& m, const std::string& name, std::int64_t rows,
                   std::int64_t cols, std::int64_t rank, bool zero) {
  Factor f;
  f.rows = rows, f.cols = cols;
  torch::NoGradGuard no_grad;
  if (rank == 0) {
    f.full =
        m.register_parameter(name, zero ? torch::zeros({rows, cols}) : kaiming_uniform(rows, cols));
  } else {
    f.a = m.register_parameter(name + "_a", kaiming_uniform(rows, rank));
    f.b = m.register_parameter(name + "_b",
                               zero ? torch::zeros({rank, cols}) : kaiming_uniform(rank, cols));
  }
  return f;
}

// peft's rule for when a factor of `rows` x `cols` is kept as a rank-r product.
std::int64_t factor_rank(std::int64_t r, std::int64_t rows, std::int64_t cols) {
  return r > 0 && 2 * r < std::max(rows, cols) ? r : 0;
}

}  // namespace

std::int64_t small_factor(std::int64_t n, std::int64_t factor) {
  if (factor > 0 && n % factor == 0) return std::min(factor, n / factor);
  std::int64_t best = 1;
  for (std::int64_t m = 1; m * m <= n; ++m)
    if (n % m == 0 && (factor <= 0 || m <= factor)) best = m;
  return best;
}

KronaDelta::KronaDelta(std::int64_t a1, std::int64_t a2, std::int64_t b1, std::int64_t b2,
                       std::int64_t rank_a, std::int64_t rank_b, double s)
    : scaling(s) {
  A = make_factor(*this, "krona_A", a1, a2, rank_a, false);
  B = make_factor(*this, "krona_B", b1, b2, rank_b, true);
}

at::Tensor KronaDelta::delta(const at::Tensor& x, const LinearImpl&) {
  auto X = x.unflatten(-1, {A.cols, B.cols});  // [..., a2, b2]
  auto Y = torch::matmul(torch::matmul(A.value().to(x.dtype()), X),
                         B.value().to(x.dtype()).t());  // [..., a1, b1]
  return Y.flatten(-2) * scaling;
}

at::Tensor KronaDelta::delta_weight(const LinearImpl&) {
  return torch::kron(A.value(), B.value()) * scaling;
}

KronaConfig KronaConfig::from_params(const Params& p) {
  check_method_keys(p, {"a_shape", "scaling", "r", "decompose_both", "decompose_factor",
                        "rank_pattern", "scaling_pattern"});
  KronaConfig c;
  c.selection = Selection::from_params(p, {"attn.q", "attn.v"});
  c.scaling = p.get_double("scaling", 1.0);
  if (p.has("a_shape")) {
    const auto& list = p.at("a_shape");
    if (list.kind() != Params::Kind::list || list.items().size() != 2)
      list.fail("expected [a1, a2]: the rows and columns of A");
    c.a_shape = {list.items()[0].as_positive_int(), list.items()[1].as_positive_int()};
  }
  c.r = p.has("r") ? p.at("r").as_positive_int() : 0;
  c.decompose_both = p.get_bool("decompose_both", false);
  if (c.decompose_both && !c.r) p.at("decompose_both").fail("decompose_both needs a rank: set r");
  if (p.has("decompose_factor")) {
    const auto& f = p.at("decompose_factor");
    c.factor = f.as_int();
    if (c.factor == 0 || c.factor < -1) f.fail("expected -1 or a positive integer");
    if (!c.a_shape.empty()) f.fail("give either a_shape or decompose_factor, not both");
  }
  c.rank_pattern = SitePatterns<std::int64_t>::read(p, "rank_pattern", positive_int);
  c.scaling_pattern = SitePatterns<double>::read(p, "scaling_pattern", positive_number);
  return c;
}

nlohmann::json KronaConfig::to_json() const {
  nlohmann::json j = {{"scaling", scaling}};
  if (!a_shape.empty()) j["a_shape"] = a_shape;
  if (factor != -1) j["decompose_factor"] = factor;
  if (r) j["r"] = r;
  if (decompose_both) j["decompose_both"] = true;
  j.update(selection.to_json());
  rank_pattern.write(j, "rank_pattern");
  scaling_pattern.write(j, "scaling_pattern");
  return j;
}

void Krona::attach(Model& model) {
  for (const auto& site : select_sites(model, c_.selection, name())) {
    if (!Model::is_linear_point(site.point))
      throw Error("krona: site '" + site.name + "' (point " + site.point +
                  ") is not a linear projection");
    const auto out = site.out_features, in = site.in_features;
    const auto a1 = c_.a_shape.empty() ? small_factor(out, c_.factor) : c_.a_shape[0];
    const auto a2 = c_.a_shape.empty() ? small_factor(in, c_.factor) : c_.a_shape[1];
    if (out % a1 != 0 || in % a2 != 0)
      where_.at("a_shape").fail("krona: site '" + site.name + "' is " + std::to_string(out) +
                                " x " + std::to_string(in) + "; A's shape must divide it");
    const auto b1 = out / a1, b2 = in / a2;
    const auto r = c_.rank_pattern.at(site, c_.r);
    auto hook = std::make_shared<KronaDelta>(
        a1, a2, b1, b2, c_.decompose_both ? factor_rank(r, a1, a2) : 0, factor_rank(r, b1, b2),
        c_.scaling_pattern.at(site, c_.scaling));
    hook->to(model.linear(site.name)->weight.device());
    add_hook(model, site.name, hook);
  }
}

namespace {

void register_krona(Registry& registry) {
  MethodInfo info;
  info.name = "krona";
  info.version = "1.1.0";
  info.description = "Kronecker-product updates s (A (x) B) on linear projections (KronA, LoKr)";
  info.mergeable = true;
  info.points = Model::linear_points();
  registry.add(info, [](const Params& p) -> std::unique_ptr<Method> {
    return std::make_unique<Krona>(KronaConfig::from_params(p), p);
  });
  registry.add_format({"peft", "krona", detect_peft, read_peft, write_peft, {}, {}, {}});
}

}  // namespace
}  // namespace graft::plugins::krona

GRAFT_PLUGIN("krona", "1.1.0", graft::plugins::krona::register_krona)
