// LoHa: delta W = (alpha / r) * (W1a W1b) ⊙ (W2a W2b) on linear sites. The Hadamard product is
// formed as a matrix (it has no low-rank form to apply to x directly), [out, in] per site, as peft
// does. Initialised as peft does: W1a, W1b, W2a Kaiming-uniform (a = sqrt(5)), W2b = 0, so the
// product is zero and the model unchanged at first.
#include <graft/plugin.h>

#include <cmath>

#include "loha.h"

namespace graft::plugins::loha {
namespace {

// Kaiming-uniform with a = sqrt(5), as torch's nn.init and peft use it: bound 1/sqrt(fan_in).
void kaiming_uniform(at::Tensor& t) {
  torch::NoGradGuard no_grad;
  const double bound = 1.0 / std::sqrt(static_cast<double>(t.size(1)));
  t.uniform_(-bound, bound);
}

}  // namespace

LohaDelta::LohaDelta(std::int64_t in, std::int64_t out, std::int64_t r, double s) : scaling(s) {
  w1_a = register_parameter("hada_w1_a", torch::empty({out, r}));
  w1_b = register_parameter("hada_w1_b", torch::empty({r, in}));
  w2_a = register_parameter("hada_w2_a", torch::empty({out, r}));
  w2_b = register_parameter("hada_w2_b", torch::zeros({r, in}));
  kaiming_uniform(w1_a);
  kaiming_uniform(w1_b);
  kaiming_uniform(w2_a);
}

at::Tensor LohaDelta::update() const {
  return torch::matmul(w1_a, w1_b) * torch::matmul(w2_a, w2_b) * scaling;
}

at::Tensor LohaDelta::delta(const at::Tensor& x, const LinearImpl&) {
  return torch::linear(x, update().to(x.dtype()));
}

LohaConfig LohaConfig::from_params(const Params& p) {
  check_method_keys(p, {"r", "alpha", "rank_pattern", "alpha_pattern"});
  LohaConfig c;
  c.r = p.get_positive_int("r", c.r);
  c.alpha = p.get_double("alpha", c.alpha);
  if (p.has("alpha") && c.alpha <= 0)
    p.at("alpha").fail("expected a positive number, got \"" + p.at("alpha").text() + "\"");
  c.selection = Selection::from_params(p, {"attn.q", "attn.v"});
  c.rank_pattern = SitePatterns<std::int64_t>::read(p, "rank_pattern", positive_int);
  c.alpha_pattern = SitePatterns<double>::read(p, "alpha_pattern", positive_number);
  return c;
}

nlohmann::json LohaConfig::to_json() const {
  nlohmann::json j = {{"r", r}, {"alpha", alpha}};
  j.update(selection.to_json());
  rank_pattern.write(j, "rank_pattern");
  alpha_pattern.write(j, "alpha_pattern");
  return j;
}

void Loha::attach(Model& model) {
  for (const auto& site : select_sites(model, c_.selection, name())) {
    if (!Model::is_linear_point(site.point))
      throw Error("loha: site '" + site.name + "' (point " + site.point +
                  ") is not a linear projection; LoHa applies to attn.q/k/v/o, ffn.gate/up/down "
                  "and head");
    auto* lin = model.linear(site.name);
    const auto rank = c_.rank_pattern.at(site, c_.r);
    const auto alpha = c_.alpha_pattern.at(site, c_.alpha);
    auto hook = std::make_shared<LohaDelta>(lin->in_features, lin->out_features, rank,
                                            alpha / static_cast<double>(rank));
    hook->to(lin->weight.device());
    add_hook(model, site.name, hook);
  }
}

namespace {

void register_loha(Registry& registry) {
  MethodInfo info;
  info.name = "loha";
  info.version = "1.0.0";
  info.description = "Hadamard products of two low-rank updates on linear projections (FedPara)";
  info.mergeable = true;
  info.points = Model::linear_points();
  registry.add(info, [](const Params& p) -> std::unique_ptr<Method> {
    return std::make_unique<Loha>(LohaConfig::from_params(p));
  });
  registry.add_format({"peft", "loha", detect_peft, read_peft, write_peft, {}, {}, {}});
}

}  // namespace
}  // namespace graft::plugins::loha

GRAFT_PLUGIN("loha", "1.0.0", graft::plugins::loha::register_loha)
