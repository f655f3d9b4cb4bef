// Compacter (Mahabadi et al. 2021) = AdapterHub's CompacterConfig / CompacterPlusPlusConfig:
// bottleneck adapters (adapter.h) whose down and up projections are parameterised hypercomplex
// multiplication (PHM) layers
//   H = sum_{i=1..n} kron(A_i, W_i)  [in, out],   y = x H + b
// A_i: n x n rule matrices (phm_rule [n, n, n]; factorized_phm_rule: phm_rule_left [n, n, 1] @
// phm_rule_right [n, 1, n]), shared by every PHM layer of the adapter (shared_phm_rule) or one per
// layer; W_i: [in/n, out/n] (factorized_phm_W: W_left [n, in/n, phm_rank] @ W_right [n, phm_rank,
// out/n]), one per layer or shared by every adapter's down (and up) projection (shared_W_phm).
// `compacter` sits after attention and the feed-forward on the sublayer output (DoubleSeqBn
// placement), `compacter++` after the feed-forward on the normalised sum (SeqBn placement); both
// reduction 32, gelu, n = 4. Widths must be divisible by n.
#include <graft/adapterhub.h>
#include <graft/plugin.h>

#include "../bottleneck/adapter.h"

namespace graft::plugins::adapters {
namespace {

struct PhmConfig {
  std::int64_t n = 4, rank = 1;
  bool shared_rule = true, factorized_rule = false, shared_W = false, factorized_W = true;
  bool bias = true, learn_rule = true;
};

/// The tensors of one PHM projection; a shared one holds the model-wide tensors.
struct PhmTensors {
  at::Tensor rule, rule_left, rule_right, W, W_left, W_right;
};

// kron(A_i, W_i) summed over i: [n p, n q].
at::Tensor phm_matrix(const at::Tensor& rule, const at::Tensor& W) {
  const auto n = rule.size(0), p = W.size(1), q = W.size(2);
  return torch::einsum("iac,ibe->abce", {rule, W}).reshape({n * p, n * q});
}

// Registers the tensors of one projection `prefix` ("down_", "up_", or "" model-wide) on `m`.
PhmTensors make_phm(torch::nn::Module& m, const std::string& prefix, const PhmConfig& c,
                    std::int64_t in, std::int64_t out, bool rules, bool weights) {
  PhmTensors t;
  const auto n = c.n;
  torch::NoGradGuard no_grad;
  if (rules) {
    // A_i ~ N(0, 1/n) (factorised: each factor N(0, n^-1/2)), graft's choice: AdapterHub draws
    // N(0, 1e-4) or N(0, 0.01), which leaves the adapter's output too small for a bfloat16 step
    // to move at first.
    const double std = 1.0 / std::sqrt(double(n));
    if (c.factorized_rule) {
      const double f = std::sqrt(std);
      t.rule_left =
          m.register_parameter(prefix + "phm_rule_left", torch::randn({n, n, 1}) * f, c.learn_rule);
      t.rule_right = m.register_parameter(prefix + "phm_rule_right", torch::randn({n, 1, n}) * f,
                                          c.learn_rule);
    } else {
      t.rule =
          m.register_parameter(prefix + "phm_rule", torch::randn({n, n, n}) * std, c.learn_rule);
    }
  }
  if (weights) {
    // Glorot-normal per i (AdapterHub's init_W), but the up projection's right factor (or its
    // whole W) is 0, as LoRA's B: the adapter starts as an exact no-op and still trains.
    const bool zero = prefix.find("up_") != std::string::npos;
    auto glorot = [](std::int64_t a, std::int64_t b, std::int64_t n) {
      return torch::randn({n, a, b}) * std::sqrt(2.0 / double(a + b));
    };
    if (c.factorized_W) {
      t.W_left = m.register_parameter(prefix + "W_left", glorot(in / n, c.rank, n));
      auto right = glorot(c.rank, out / n, n);
      t.W_right = m.register_parameter(prefix + "W_right", zero ? right.zero_() : right);
    } else {
      auto w = glorot(in / n, out / n, n);
      t.W = m.register_parameter(prefix + "W", zero ? w.zero_() : w);
    }
  }
  return t;
}

class CompacterAdapter : public Adapter {
 public:
  CompacterAdapter(const AdapterConfig& a, const PhmConfig& c, std::int64_t d, std::int64_t k,
                   std::shared_ptr<torch::nn::Module> shared)
      : Adapter(a, d, k, false), c_(c), shared_(std::move(shared)) {
    down_ = make_phm(*this, "down_", c, d, k, !c.shared_rule, !c.shared_W);
    up_ = make_phm(*this, "up_", c, k, d, !c.shared_rule, !c.shared_W);
    if (c.bias) {
      down_bias = register_parameter("down_bias", torch::zeros({k}));
      up_bias = register_parameter("up_bias", torch::zeros({d}));
    }
  }

 protected:
  at::Tensor down(const at::Tensor& h) override { return apply(h, down_, "down_", down_bias); }
  at::Tensor up(const at::Tensor& h) override { return apply(h, up_, "up_", up_bias); }

 private:
  at::Tensor apply(const at::Tensor& x, const PhmTensors& own, const std::string& side,
                   const at::Tensor& bias) {
    auto get = [&](const at::Tensor& mine, const std::string& name) {
      return mine.defined() ? mine : shared_->named_parameters(false)[name];
    };
    at::Tensor rule = c_.factorized_rule ? torch::bmm(get(own.rule_left, "phm_rule_left"),
                                                      get(own.rule_right, "phm_rule_right"))
                                         : get(own.rule, "phm_rule");
    at::Tensor W = c_.factorized_W ? torch::bmm(get(own.W_left, "W_" + side + "left"),
                                                get(own.W_right, "W_" + side + "right"))
                                   : get(own.W, "W_" + side.substr(0, side.size() - 1));
    auto y = torch::matmul(x, phm_matrix(rule, W).to(x.dtype()));
    return bias.defined() ? y + bias.to(x.dtype()) : y;
  }
  PhmConfig c_;
  std::shared_ptr<torch::nn::Module> shared_;
  PhmTensors down_, up_;
};

class Compacter : public HookMethod {
 public:
  Compacter(std::string name, AdapterConfig a, PhmConfig c)
      : name_(std::move(name)), a_(std::move(a)), c_(c) {}
  std::string name() const override { return name_; }
  nlohmann::json config() const override {
    auto j = a_.to_json();
    j.update({{"n", c_.n},
              {"phm_rank", c_.rank},
              {"shared_phm_rule", c_.shared_rule},
              {"factorized_phm_rule", c_.factorized_rule},
              {"shared_W_phm", c_.shared_W},
              {"factorized_phm_W", c_.factorized_W},
              {"phm_bias", c_.bias},
              {"learn_phm", c_.learn_rule}});
    return j;
  }
  const AdapterConfig& adapter() const { return a_; }
  const PhmConfig& phm() const { return c_; }

  void attach(Model& model) override {
    const auto sites = select_sites(model, a_.selection, name());
    std::int64_t d = -1, k = -1;
    for (const auto& site : sites) {  // every width checked before anything is allocated
      if (!is_sublayer_point(site.point))
        throw Error(name() + ": site '" + site.name + "' (point " + site.point +
                    ") is not a sublayer output; compacter sits at attn.out or ffn.out");
      d = site.out_features, k = a_.width(site, name());
      if (d % c_.n != 0 || k % c_.n != 0)
        throw Error(name() + ": site '" + site.name + "': its width " + std::to_string(d) +
                    " and bottleneck width " + std::to_string(k) + " (" + std::to_string(d) +
                    " / reduction_factor) must both be divisible by n = " + std::to_string(c_.n) +
                    "; change reduction_factor or n");
    }
    shared_ = std::make_shared<torch::nn::Module>();
    if (c_.shared_rule) make_phm(*shared_, "", c_, 0, 0, true, false);
    if (c_.shared_W) {
      make_phm(*shared_, "W_down_", c_, d, k, false, true);
      make_phm(*shared_, "W_up_", c_, k, d, false, true);
      rename_shared_W();
    }
    shared_->to(model.parameters().front().device());
    for (const auto& site : sites)
      add_hook(model, site.name,
               std::make_shared<CompacterAdapter>(a_, c_, site.out_features, a_.width(site, name()),
                                                  shared_));
  }
  void detach(Model& model) override {
    HookMethod::detach(model);
    shared_.reset();
  }
  // The model-wide tensors are the method's, held once under their own names.
  std::vector<std::pair<std::string, at::Tensor>> trainable_parameters() override {
    auto out = HookMethod::trainable_parameters();
    if (shared_)
      for (const auto& p : shared_->named_parameters(false))
        if (p.value().requires_grad()) out.emplace_back(p.key(), p.value());
    return out;
  }
  io::TensorMap state() override {
    auto out = HookMethod::state();
    if (shared_)
      for (const auto& p : shared_->named_parameters(false)) out[p.key()] = p.value();
    return out;
  }
  void load_state(const io::TensorMap& state, const std::string& source) override {
    if (!shared_) throw Error(name() + ": not attached to a model");
    auto own = state;
    torch::NoGradGuard no_grad;
    for (auto& p : shared_->named_parameters(false)) {
      auto it = own.find(p.key());
      if (it == own.end()) throw FileError(source, name() + ": missing tensor '" + p.key() + "'");
      if (it->second.sizes() != p.value().sizes())
        throw FileError(source, name() + ": '" + p.key() + "' has shape " +
                                    c10::str(it->second.sizes()) + " but n = " +
                                    std::to_string(c_.n) + " needs " + c10::str(p.value().sizes()));
      p.value().copy_(it->second);
      own.erase(it);
    }
    HookMethod::load_state(own, source);
  }

 private:
  // make_phm named the shared W tensors "W_down_W_left" and so on; AdapterHub's names are
  // W_down_left, W_down_right, W_down (and up): keep those.
  void rename_shared_W() {
    auto fresh = std::make_shared<torch::nn::Module>();
    for (const auto& p : shared_->named_parameters(false)) {
      auto key = p.key();
      for (const std::string side : {"down", "up"}) {
        const auto from = "W_" + side + "_W";
        if (key.rfind(from, 0) == 0) key = "W_" + side + key.substr(from.size());
      }
      fresh->register_parameter(key, p.value(), p.value().requires_grad());
    }
    shared_ = fresh;
  }

  std::string name_;
  AdapterConfig a_;
  PhmConfig c_;
  std::shared_ptr<torch::nn::Module> shared_;
};

const std::vector<std::string> kPhmKeys = {"n",
                                           "phm_rank",
                                           "shared_phm_rule",
                                           "factorized_phm_rule",
                                           "shared_W_phm",
                                           "factorized_phm_W",
                                           "phm_bias",
                                           "learn_phm"};

PhmConfig phm_from_params(const Params& p) {
  PhmConfig c;
  c.n = p.get_positive_int("n", c.n);
  c.rank = p.get_positive_int("phm_rank", c.rank);
  c.shared_rule = p.get_bool("shared_phm_rule", c.shared_rule);
  c.factorized_rule = p.get_bool("factorized_phm_rule", c.factorized_rule);
  c.shared_W = p.get_bool("shared_W_phm", c.shared_W);
  c.factorized_W = p.get_bool("factorized_phm_W", c.factorized_W);
  c.bias = p.get_bool("phm_bias", c.bias);
  c.learn_rule = p.get_bool("learn_phm", c.learn_rule);
  return c;
}

// The AdapterHub names of a compacter adapter's own tensors (graft name, AdapterHub suffix).
NamePairs phm_names(const AdapterConfig& a, const PhmConfig& c) {
  auto names = hub_names(a, false);
  const auto down = "adapter_down." + down_index(a) + ".";
  for (const auto& [side, hub] : {std::pair<std::string, std::string>{"down_", down},
                                  std::pair<std::string, std::string>{"up_", "adapter_up."}}) {
    if (!c.shared_rule) {
      if (c.factorized_rule) {
        names.push_back({side + "phm_rule_left", hub + "phm_rule_left"});
        names.push_back({side + "phm_rule_right", hub + "phm_rule_right"});
      } else {
        names.push_back({side + "phm_rule", hub + "phm_rule"});
      }
    }
    if (!c.shared_W) {
      if (c.factorized_W) {
        names.push_back({side + "W_left", hub + "W_left"});
        names.push_back({side + "W_right", hub + "W_right"});
      } else {
        names.push_back({side + "W", hub + "W"});
      }
    }
    if (c.bias) names.push_back({side + "bias", hub + "b"});
  }
  return names;
}

bool reads_part(const nlohmann::json& part) {
  const auto& a = part.value("architecture", nlohmann::json());
  return (a.is_null() || a == "bottleneck") && part.value("phm_layer", false) == true;
}

std::vector<std::unique_ptr<Method>> read_part(const nlohmann::json& part, const std::string& name,
                                               io::TensorMap& tensors, Model& model,
                                               const std::string& source) {
  auto settings = bottleneck_settings(part, source);
  const Source where{source, 0, 0};
  auto set = [&](const std::string& key, const std::string& hub, const nlohmann::json& fallback) {
    const auto v = part.value(hub, fallback);
    settings.set(key, Params::scalar(v.is_boolean() ? (v.get<bool>() ? "true" : "false") : v.dump(),
                                     hub, where));
  };
  set("n", "phm_dim", 4);
  set("phm_rank", "phm_rank", 1);
  for (const auto* key :
       {"shared_phm_rule", "factorized_phm_rule", "shared_W_phm", "factorized_phm_W", "phm_bias"})
    set(key, key, false);
  const auto c = phm_from_params(settings);
  // AdapterHub (to 1.1 at least) keeps shared tensors in shared_parameters, which save_adapter
  // does not write: such a file lacks the tensors its adapter computes with.
  if (c.shared_rule || c.shared_W)
    throw FileError(source, std::string("the adapter shares ") +
                                (c.shared_rule ? "its PHM rule (shared_phm_rule)"
                                               : "its PHM weights (shared_W_phm)") +
                                " across layers, which AdapterHub's save_adapter does not save; "
                                "the file cannot hold what the adapter computes");
  auto a = AdapterConfig::from_params(settings, AdapterConfig(), {"ffn.out"}, kPhmKeys);
  return adapterhub::attach_part(
      std::make_unique<Compacter>("compacter", a, c), model, source, [&](Method& m) {
        return from_hub(tensors, name, m.state(), model, phm_names(a, c), source);
      });
}

std::pair<nlohmann::json, io::TensorMap> write_part(Method& method, const Model& model,
                                                    const std::string& name) {
  auto* m = dynamic_cast<Compacter*>(&method);
  if (!m) throw Error(method.name() + ": not a compacter adapter");
  const auto& c = m->phm();
  if (c.shared_rule || c.shared_W)
    throw Error(method.name() +
                ": shared PHM tensors (shared_phm_rule, shared_W_phm) have no "
                "place in AdapterHub's saved files (save_adapter leaves them out); "
                "train with shared_phm_rule: false and shared_W_phm: false to "
                "export");
  auto part = bottleneck_part(m->adapter(), model, method.name());
  part.update({{"phm_layer", true},
               {"phm_dim", c.n},
               {"phm_rank", c.rank},
               {"shared_phm_rule", false},
               {"factorized_phm_rule", c.factorized_rule},
               {"shared_W_phm", false},
               {"factorized_phm_W", c.factorized_W},
               {"phm_bias", c.bias},
               {"learn_phm", c.learn_rule},
               {"phm_c_init", "normal"},
               {"phm_init_range", 0.0001},
               {"hypercomplex_nonlinearity", "glorot-uniform"}});
  return {part, to_hub(method.state(), name, model, phm_names(m->adapter(), c))};
}

void add(Registry& registry, const std::string& name, const std::string& description,
         std::vector<std::string> targets, bool ln_before_sum) {
  AdapterConfig preset;
  preset.reduction_factor = 32;
  preset.non_linearity = "gelu";
  preset.original_ln_before = ln_before_sum;
  MethodInfo info;
  info.name = name;
  info.version = "2.0.0";
  info.description = description;
  info.points = {"attn.out", "ffn.out"};
  registry.add(info, [=](const Params& p) -> std::unique_ptr<Method> {
    auto a = AdapterConfig::from_params(p, preset, targets, kPhmKeys);
    return std::make_unique<Compacter>(name, a, phm_from_params(p));
  });
  if (name == "compacter")  // one reader for every PHM part
    registry.add_format(adapterhub::part_format(name, reads_part, read_part, write_part));
  else
    registry.add_format(adapterhub::part_format(name, {}, {}, write_part));
}

void register_compacter(Registry& registry) {
  add(registry, "compacter", "AdapterHub compacter: PHM adapters after attention and feed-forward",
      {"attn.out", "ffn.out"}, false);
  add(registry, "compacter++", "AdapterHub compacter++: PHM adapter after the feed-forward",
      {"ffn.out"}, true);
}

}  // namespace
}  // namespace graft::plugins::adapters

GRAFT_PLUGIN("compacter", "2.0.0", graft::plugins::adapters::register_compacter)
