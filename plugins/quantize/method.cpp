// quantize: holds the frozen base weights of the selected linear sites in 4-bit NormalFloat
// (optionally with double quantisation) and dequantises them in the forward. With lora on the same
// sites this is QLoRA (Dettmers et al. 2023). The base weight tensor itself is released (it keeps
// its dtype and device but no elements), so the memory saving is real; detach() and merge() put
// the dequantised weight back (the quantisation error stays; merging says so).
#include <graft/plugin.h>

#include <iostream>
#include <sstream>

#include "nf4.h"

namespace graft::plugins::quantize {
namespace {

class Nf4Weight : public WeightTransform {
 public:
  explicit Nf4Weight(Nf4 q) : q_(std::move(q)) {
    register_buffer("codes", q_.codes);
    if (q_.absmax.defined()) register_buffer("absmax", q_.absmax);
    if (q_.absmax_q.defined()) {
      register_buffer("absmax_q", q_.absmax_q);
      register_buffer("absmax_scale", q_.absmax_scale);
    }
  }
  at::Tensor transform(const at::Tensor& weight, const LinearImpl&) override {
    sync();
    return q_.dequantize().to(weight.dtype());
  }
  bool mergeable() const override { return true; }
  bool recomputable() const override { return true; }  // the backward dequantises again
  at::Tensor dequantized() {
    sync();
    return q_.dequantize();
  }
  std::int64_t bytes() const { return q_.bytes(); }

 private:
  // Buffers may have been moved to another device by Module::to(); read them back.
  void sync() {
    auto b = named_buffers(false);
    q_.codes = b["codes"];
    if (b.contains("absmax")) q_.absmax = b["absmax"];
    if (b.contains("absmax_q")) q_.absmax_q = b["absmax_q"], q_.absmax_scale = b["absmax_scale"];
  }
  Nf4 q_;
};

std::string kib(std::int64_t bytes) {
  std::ostringstream os;
  os.precision(1);
  os << std::fixed << bytes / 1024.0 << " KiB";
  return os.str();
}

class Quantize : public HookMethod {
 public:
  explicit Quantize(const Params& p) {
    check_method_keys(p, {"double_quant"});
    double_quant_ = p.get_bool("double_quant", true);
    selection_ = Selection::from_params(p, {"all-linear"});
  }
  std::string name() const override { return "quantize"; }
  nlohmann::json config() const override {
    nlohmann::json j = {{"double_quant", double_quant_}};
    j.update(selection_.to_json());
    return j;
  }

  void attach(Model& model) override {
    before_ = after_ = 0;
    for (const auto& site : select_sites(model, selection_, name())) {
      if (!Model::is_linear_point(site.point))
        throw Error("quantize: site '" + site.name + "' (point " + site.point +
                    ") is not a linear projection");
      auto* lin = model.linear(site.name);
      if (!lin->named_parameters(false).contains("weight"))
        throw Error("quantize: site '" + site.name +
                    "' shares its weight with the token embeddings (a tied head); leave it out");
      if (!model.hooks(site.name).weight_transforms.empty())
        throw Error("quantize: site '" + site.name +
                    "' already has a weight transform; list quantize before the other methods");
      if (lin->weight.requires_grad())
        throw Error("quantize: site '" + site.name +
                    "' is being trained (full or layer_select); a quantised base stays frozen");
      auto hook = std::make_shared<Nf4Weight>(Nf4::quantize(lin->weight.detach(), double_quant_));
      before_ += lin->weight.numel() * 4;
      after_ += hook->bytes();
      release(*lin);
      add_hook(model, site.name, hook);
    }
  }
  void detach(Model& model) override {
    restore(model);
    HookMethod::detach(model);
  }
  void merge(Model& model) override {
    if (merged()) return;
    std::cerr << "quantize: merging dequantises the NF4 base weights of " << hook_list().size()
              << " sites (the quantisation error stays in them)\n";
    restore(model);
    for (const auto& [site, hook] : hook_list()) model.detach(site, hook);
    merged_ = true;
  }
  void unmerge(Model& model) override {
    if (!merged()) return;
    for (const auto& [site, hook] : hook_list()) {
      auto* lin = model.linear(site);
      release(*lin);
      model.attach(site, hook, name());
    }
    merged_ = false;
  }
  bool merged() const override { return merged_; }

  std::string report() const override {
    std::ostringstream os;
    os.precision(3);
    os << "quantize: " << hook_list().size() << " base weights, " << kib(before_) << " as F32 -> "
       << kib(after_) << " as NF4" << (double_quant_ ? " with double quantisation" : "") << " ("
       << static_cast<double>(after_) / std::max<std::int64_t>(before_, 1) << "x)";
    return os.str();
  }
  std::int64_t bytes_before() const { return before_; }
  std::int64_t bytes_after() const { return after_; }

 private:
  // The weight keeps its dtype and device but holds nothing: the NF4 copy is the base now.
  static void release(LinearImpl& lin) {
    torch::NoGradGuard no_grad;
    lin.weight.set_(torch::empty({0}, lin.weight.options()));
  }
  void restore(Model& model) {
    torch::NoGradGuard no_grad;
    for (const auto& [site, hook] : hook_list()) {
      auto* lin = model.linear(site);
      if (lin->weight.numel() != 0) continue;
      auto w = std::static_pointer_cast<Nf4Weight>(hook)->dequantized();
      lin->weight.set_(w.to(lin->weight.options()).contiguous());
    }
  }
  bool double_quant_ = true;
  bool merged_ = false;
  Selection selection_;
  std::int64_t before_ = 0, after_ = 0;
};

void register_quantize(Registry& registry) {
  MethodInfo info;
  info.name = "quantize";
  info.version = "1.0.0";
  info.description = "NF4 (4-bit NormalFloat) frozen base weights, for QLoRA";
  info.mergeable = true;
  info.points = Model::linear_points();
  registry.add(info, [](const Params& p) -> std::unique_ptr<Method> {
    return std::make_unique<Quantize>(p);
  });
}

}  // namespace
}  // namespace graft::plugins::quantize

GRAFT_PLUGIN("quantize", "1.0.0", graft::plugins::quantize::register_quantize)
