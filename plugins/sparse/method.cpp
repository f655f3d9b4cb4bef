// sparse: trains a fixed sparse subset of the selected weight matrices' entries, chosen once
// before training by magnitude (the largest |W|), at random, or by gradient magnitude summed over a
// few training batches (`selection: gradient`, run by calibrate()). Each site's delta is a weight
// transform W + scatter(indices, values); the adapter stores the indices and the values. Mergeable.
#include <ATen/CPUGeneratorImpl.h>
#include <graft/plugin.h>
#include <torch/torch.h>

#include <cmath>

namespace graft::plugins::sparse {
namespace {

class SparseDelta : public WeightTransform {
 public:
  explicit SparseDelta(at::Tensor idx) {
    indices = register_parameter("indices", std::move(idx), false);
    values = register_parameter("values", torch::zeros({indices.size(0)}));
  }
  at::Tensor transform(const at::Tensor& weight, const LinearImpl&) override {
    auto delta = torch::zeros({weight.numel()}, values.options())
                     .index_add(0, indices, values)
                     .view(weight.sizes());
    return weight + delta.to(weight.dtype());
  }
  bool mergeable() const override { return true; }
  at::Tensor indices, values;
};

class Sparse : public HookMethod {
 public:
  explicit Sparse(const Params& p) : where_(p) {
    check_method_keys(p, {"selection", "density", "seed", "calibration_batches"});
    selection_kind_ = p.get_choice("selection", {"magnitude", "random", "gradient"}, "magnitude");
    density_ = p.has("density") ? p.at("density").as_probability() : 0.005;
    if (density_ <= 0) p.at("density").fail("expected a density in (0, 1), got 0");
    seed_ = static_cast<std::uint64_t>(p.get_int("seed", 0));
    batches_ = p.get_positive_int("calibration_batches", 4);
    selection_ = Selection::from_params(p, {"all-linear"});
  }
  std::string name() const override { return "sparse"; }
  nlohmann::json config() const override {
    nlohmann::json j = {{"selection", selection_kind_},
                        {"density", density_},
                        {"seed", seed_},
                        {"calibration_batches", batches_}};
    j.update(selection_.to_json());
    return j;
  }

  void attach(Model& model) override {
    auto gen = at::detail::createCPUGenerator(seed_);
    for (const auto& site : select_sites(model, selection_, name())) {
      if (!Model::is_linear_point(site.point))
        throw Error("sparse: site '" + site.name + "' (point " + site.point +
                    ") is not a linear projection");
      auto* lin = model.linear(site.name);
      const auto numel = site.in_features * site.out_features;
      const auto k = count(numel);
      at::Tensor idx;
      if (selection_kind_ == "random") {
        idx = torch::randperm(numel, gen, torch::kLong).narrow(0, 0, k);
      } else {  // magnitude, and the placeholder until gradient calibration replaces it
        idx = std::get<1>(lin->effective_weight().detach().abs().reshape({-1}).topk(k)).cpu();
      }
      auto hook = std::make_shared<SparseDelta>(std::get<0>(idx.sort()).contiguous());
      hook->to(lin->weight.device());
      add_hook(model, site.name, hook);
    }
    calibrated_ = selection_kind_ != "gradient";
  }

  bool needs_calibration() const override { return !calibrated_; }
  void calibrate(Model& model, const std::function<at::Tensor()>& loss) override {
    std::vector<std::pair<LinearImpl*, SparseDelta*>> sites;
    for (const auto& [site, hook] : hook_list())
      sites.emplace_back(model.linear(site), static_cast<SparseDelta*>(hook.get()));
    for (auto& [lin, h] : sites) lin->weight.set_requires_grad(true);
    std::vector<at::Tensor> score(sites.size());
    for (std::int64_t b = 0; b < batches_; ++b) {
      for (auto& [lin, h] : sites) lin->weight.mutable_grad() = at::Tensor();
      loss().backward();
      for (std::size_t i = 0; i < sites.size(); ++i) {
        auto g = sites[i].first->weight.grad().detach().abs();
        score[i] = score[i].defined() ? score[i] + g : g;
      }
    }
    torch::NoGradGuard no_grad;
    for (std::size_t i = 0; i < sites.size(); ++i) {
      auto& [lin, h] = sites[i];
      lin->weight.mutable_grad() = at::Tensor();
      lin->weight.set_requires_grad(false);
      auto idx = std::get<1>(score[i].reshape({-1}).topk(h->indices.size(0)));
      h->indices.copy_(std::get<0>(idx.sort()));
    }
    for (auto& p : model.parameters())
      if (p.grad().defined()) p.mutable_grad() = at::Tensor();
    calibrated_ = true;
  }

  std::vector<std::pair<std::string, at::Tensor>> trainable_parameters() override {
    if (!calibrated_)
      where_.at("selection")
          .fail(
              "sparse: selection: gradient chooses its entries from a few training batches; call "
              "calibrate() before training (graft run does this)");
    return HookMethod::trainable_parameters();
  }
  void load_state(const io::TensorMap& state, const std::string& source) override {
    HookMethod::load_state(state, source);
    calibrated_ = true;
  }

 private:
  std::int64_t count(std::int64_t numel) const {
    return std::max<std::int64_t>(1, std::llround(density_ * static_cast<double>(numel)));
  }
  Params where_;
  std::string selection_kind_;
  double density_ = 0.005;
  std::uint64_t seed_ = 0;
  std::int64_t batches_ = 4;
  Selection selection_;
  bool calibrated_ = true;
};

void register_sparse(Registry& registry) {
  MethodInfo info;
  info.name = "sparse";
  info.version = "1.0.0";
  info.description = "trains a fixed sparse subset of weights (magnitude, random or gradient)";
  info.mergeable = true;
  info.points = Model::linear_points();
  registry.add(
      info, [](const Params& p) -> std::unique_ptr<Method> { return std::make_unique<Sparse>(p); });
}

}  // namespace
}  // namespace graft::plugins::sparse

GRAFT_PLUGIN("sparse", "1.0.0", graft::plugins::sparse::register_sparse)
