// LoRA adapter arithmetic: several LoRA adapters made into one (graft combine), as peft's
// add_weighted_adapter defines each type. w_i is source i's weight, s_i its scaling (alpha/r,
// times its scale); at each site only the sources that adapt it take part.
//
//   linear           A = sum sqrt(w_i s_i) A_i,  B = sum sqrt(w_i s_i) B_i   (equal ranks)
//   cat              A = rows [w_i s_i A_i],  B = columns [B_i]   (rank sum r_i, zero-padded)
//   svd              B A = the best rank-k approximation of sum w_i s_i B_i A_i
//   ties             per factor: each source's largest entries (density), the sign of their sum
//                    (or count) elected, the agreeing entries' weighted mean
//   magnitude_prune  per factor: sum sqrt(w_i s_i) top(X_i)
//   dare_linear      per factor: sum sqrt(w_i s_i) X_i * mask_i / density, mask_i ~ Bernoulli
//   dare_ties        DARE's rescaled random masks, then ties' election and mean
// The result has alpha = r (scaling 1).
#include <ATen/CPUGeneratorImpl.h>
#include <graft/error.h>

#include <algorithm>
#include <cmath>
#include <map>
#include <set>

#include "layer.h"
#include "lora.h"

namespace graft::plugins::lora {

namespace {

struct Factors {
  at::Tensor A, B;  // [r, in], [out, r]
  double scaling;
  double weight;
};

// Keeps the round(density * numel) largest magnitudes of x (as peft: int(density * numel)).
at::Tensor keep_largest(const at::Tensor& x, double density) {
  const auto k = static_cast<std::int64_t>(density * static_cast<double>(x.numel()));
  auto mask = torch::zeros({x.numel()}, x.options());
  if (k > 0) mask.index_fill_(0, std::get<1>(x.abs().reshape({-1}).topk(k)), 1.0);
  return x * mask.view(x.sizes());
}

// DARE: each entry kept with probability `density` and rescaled by 1 / density.
at::Tensor drop_and_rescale(const at::Tensor& x, double density, at::Generator& gen) {
  const auto keep = torch::bernoulli(torch::full(x.sizes(), density, x.options()), gen);
  return x * keep / density;
}

// TIES' sign election and disjoint mean over the stacked [n, ...] tensors, weighted per source.
at::Tensor elect_and_merge(const at::Tensor& stacked, const at::Tensor& weights,
                           const std::string& majority) {
  const auto sign = stacked.sign();
  const auto magnitude = majority == "frequency" ? sign.sum(0) : stacked.sum(0);
  const auto elected =
      torch::where(magnitude >= 0, torch::ones_like(magnitude), -torch::ones_like(magnitude));
  const auto agree = (sign == elected.unsqueeze(0)).to(stacked.dtype());
  auto shape = std::vector<std::int64_t>(stacked.dim(), 1);
  shape[0] = -1;
  const auto merged = (stacked * weights.view(shape) * agree).sum(0);
  return merged / agree.sum(0).clamp_min(1.0);
}

// One factor of the sources at a site, combined as `type` says (the per-factor types).
at::Tensor combine_factor(const std::vector<at::Tensor>& xs, const std::vector<double>& v,
                          const CombineOptions& o, at::Generator& gen) {
  std::vector<at::Tensor> kept;
  for (const auto& x : xs) {
    if (o.type == "linear")
      kept.push_back(x);
    else if (o.type == "ties" || o.type == "magnitude_prune")
      kept.push_back(keep_largest(x, o.density));
    else
      kept.push_back(drop_and_rescale(x, o.density, gen));
  }
  const auto stacked = torch::stack(kept);
  const auto weights = torch::tensor(v, stacked.options());
  if (o.type == "ties" || o.type == "dare_ties")
    return elect_and_merge(stacked, weights, o.majority_sign);
  auto shape = std::vector<std::int64_t>(stacked.dim(), 1);
  shape[0] = -1;
  return (stacked * weights.view(shape)).sum(0);
}

// The new factors of one site: {A [k, in], B [out, k]} for rank k.
std::pair<at::Tensor, at::Tensor> combine_site(const std::vector<Factors>& fs,
                                               const CombineOptions& o, std::int64_t rank,
                                               at::Generator& gen) {
  if (o.type == "cat") {
    std::vector<at::Tensor> as, bs;
    for (const auto& f : fs) {
      as.push_back(f.A * (f.weight * f.scaling));
      bs.push_back(f.B);
    }
    auto A = torch::cat(as, 0), B = torch::cat(bs, 1);
    const auto pad = rank - A.size(0);  // sources that do not adapt this site
    if (pad > 0) {
      A = torch::cat({A, torch::zeros({pad, A.size(1)}, A.options())}, 0);
      B = torch::cat({B, torch::zeros({B.size(0), pad}, B.options())}, 1);
    }
    return {A, B};
  }
  if (o.type == "svd") {
    at::Tensor delta;
    for (const auto& f : fs) {
      const auto d = torch::matmul(f.B, f.A) * (f.weight * f.scaling);
      delta = delta.defined() ? delta + d : d;
    }
    const auto k = std::min({rank, delta.size(0), delta.size(1)});
    const auto [U, S, Vh] = at::linalg_svd(delta, false);
    auto B = U.slice(1, 0, k) * S.slice(0, 0, k).unsqueeze(0);
    auto A = Vh.slice(0, 0, k);
    if (o.svd_clamp > 0) {
      const auto dist = torch::cat({B.reshape({-1}), A.reshape({-1})});
      const auto hi = torch::quantile(dist, o.svd_clamp).item<double>();
      B = B.clamp(-hi, hi);
      A = A.clamp(-hi, hi);
    }
    if (k < rank) {  // a site narrower than the rank: the rest stays zero
      A = torch::cat({A, torch::zeros({rank - k, A.size(1)}, A.options())}, 0);
      B = torch::cat({B, torch::zeros({B.size(0), rank - k}, B.options())}, 1);
    }
    return {A.contiguous(), B.contiguous()};
  }
  std::vector<at::Tensor> as, bs;
  std::vector<double> v;
  for (const auto& f : fs) {
    as.push_back(f.A);
    bs.push_back(f.B);
    v.push_back(std::sqrt(f.weight * f.scaling));
  }
  auto A = combine_factor(as, v, o, gen);
  auto B = combine_factor(bs, v, o, gen);
  return {A, B};
}

const Lora& source_lora(const Method* m, std::size_t i) {
  const auto* lora = dynamic_cast<const Lora*>(m);
  if (!lora)
    throw Error("lora combine: source " + std::to_string(i + 1) + " is not a LoRA adapter");
  const auto& c = lora->settings();
  if (c.dora || c.gating)
    throw Error("lora combine: source " + std::to_string(i + 1) + " uses " +
                (c.dora ? "dora" : "gating") +
                "; combinations are defined for plain LoRA updates s B A");
  return *lora;
}

}  // namespace

std::unique_ptr<Method> combine(const std::vector<Method*>& sources, const CombineOptions& o,
                                Model& model) {
  const bool per_factor = o.type != "cat" && o.type != "svd";
  if (!(o.density > 0 && o.density <= 1))
    throw Error("lora combine: density " + std::to_string(o.density) + ": expected (0, 1]");
  if (o.majority_sign != "total" && o.majority_sign != "frequency")
    throw Error("lora combine: majority_sign '" + o.majority_sign +
                "': expected total or frequency");
  if (o.svd_rank < 0) throw Error("lora combine: svd_rank must be positive (0: the largest rank)");
  if (!(o.svd_clamp >= 0 && o.svd_clamp < 1))
    throw Error("lora combine: svd_clamp: expected a quantile in [0, 1) (0: no clamp)");
  // Each source's factors by site, and the ranks.
  std::map<std::string, std::vector<Factors>> by_site;
  std::int64_t rank_sum = 0, rank_max = 0;
  std::set<std::int64_t> ranks;
  for (std::size_t i = 0; i < sources.size(); ++i) {
    const auto& lora = source_lora(sources[i], i);
    if (per_factor && !(o.weights[i] >= 0))
      throw Error("lora combine: " + o.type + " scales each source's factors by sqrt(weight * " +
                  "scaling): weight " + std::to_string(o.weights[i]) +
                  " must not be negative (cat and svd take any weight)");
    std::int64_t rank = -1;
    for (const auto& [site, hook] : lora.hooks()) {
      const auto d = std::dynamic_pointer_cast<LoraDelta>(hook);
      if (rank >= 0 && d->A.size(0) != rank)
        throw Error("lora combine: source " + std::to_string(i + 1) +
                    " has ranks that differ between sites (a rank pattern); combine takes one "
                    "rank per source");
      rank = d->A.size(0);
      by_site[site].push_back({d->A.detach(), d->B.detach(), d->scaling, o.weights[i]});
    }
    rank_sum += rank;
    rank_max = std::max(rank_max, rank);
    ranks.insert(rank);
  }
  if (per_factor && ranks.size() > 1)
    throw Error("lora combine: " + o.type +
                " adds the sources' factors, so their ranks must be equal (they are " +
                std::to_string(*ranks.begin()) + " and " + std::to_string(*ranks.rbegin()) +
                "); use cat or svd");
  const std::int64_t rank = o.type == "cat"   ? rank_sum
                            : o.type == "svd" ? (o.svd_rank > 0 ? o.svd_rank : rank_max)
                                              : rank_max;
  // The new adapter: the union of the sites, rank `rank`, alpha = rank.
  LoraConfig c;
  c.r = rank;
  c.alpha = static_cast<double>(rank);
  for (const auto& site : model.sites())
    if (by_site.count(site.name)) c.selection.targets.push_back(site.name);
  auto out = std::make_unique<Lora>(c);
  out->attach(model);
  auto gen = at::make_generator<at::CPUGeneratorImpl>(o.seed);
  torch::NoGradGuard no_grad;
  for (const auto& [site, hook] : out->hooks()) {  // in model order: the masks' order too
    const auto d = std::dynamic_pointer_cast<LoraDelta>(hook);
    auto fs = by_site.at(site);
    for (auto& f : fs) {  // the combination in float32 on the CPU, as the masks are drawn
      f.A = f.A.to(torch::kCPU, torch::kFloat);
      f.B = f.B.to(torch::kCPU, torch::kFloat);
    }
    const auto [A, B] = combine_site(fs, o, rank, gen);
    d->A.copy_(A);
    d->B.copy_(B);
  }
  return out;
}

}  // namespace graft::plugins::lora
