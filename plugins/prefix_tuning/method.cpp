// Prefix tuning (Li and Liang 2021): per layer, P learned key and value vectors per key/value head
// are prepended to the attention's keys and values; the mask is extended and the real tokens'
// positions start after the prefix (as transformers does with peft's past_key_values). During
// training the prefix comes from a reparameterising MLP
//   Embedding(P, d) -> Linear(d, bottleneck) -> tanh -> Linear(bottleneck, layers * 2 * kv_dim)
// (`flat: true` trains the flat tensor directly); the adapter stores only the resulting flat
// tensor [P, layers * 2 * kv_dim], laid out as peft's prompt_embeddings: for each virtual token,
// layer l's keys at (2 l) * kv_dim and its values at (2 l + 1) * kv_dim, heads then head_dim.
#include <graft/adapterhub.h>
#include <graft/peft.h>
#include <graft/plugin.h>
#include <torch/torch.h>

#include "../common/peft_shared.h"

namespace graft::plugins::prefix_tuning {
namespace {
namespace fs = std::filesystem;

struct Config {
  std::int64_t num_virtual_tokens = 30;
  std::int64_t bottleneck = 512;  ///< peft's encoder_hidden_size
  bool flat = false;
  double dropout = 0.0;
  bool gating = false;  ///< UniPELT: scale the prefix's keys and values by a gate on the input
  bool shared_gating = true;  ///< one gate for keys and values, or one each
  /// peft: one prefix per key/value head, the tokens' positions start after it; adapterhub: one
  /// per query head (after grouped-query attention repeats the keys), positions unchanged.
  std::string style = "peft";
};

/// The prefix of every layer: the MLP's parameters, or the flat tensor.
class PrefixStore : public torch::nn::Module {
 public:
  PrefixStore(const Config& c, std::int64_t d, std::int64_t layers, std::int64_t kv_dim)
      : width(layers * 2 * kv_dim) {
    if (c.flat) {
      flat = register_parameter("prefix", torch::randn({c.num_virtual_tokens, width}));
      return;
    }
    embedding = register_parameter("embedding", torch::randn({c.num_virtual_tokens, d}));
    w1 = register_parameter("mlp_1_weight", torch::empty({c.bottleneck, d}));
    b1 = register_parameter("mlp_1_bias", torch::zeros({c.bottleneck}));
    w2 = register_parameter("mlp_2_weight", torch::empty({width, c.bottleneck}));
    b2 = register_parameter("mlp_2_bias", torch::zeros({width}));
    torch::NoGradGuard no_grad;  // torch.nn.Linear's default initialisation
    w1.uniform_(-1.0 / std::sqrt(double(d)), 1.0 / std::sqrt(double(d)));
    w2.uniform_(-1.0 / std::sqrt(double(c.bottleneck)), 1.0 / std::sqrt(double(c.bottleneck)));
  }
  /// Columns [from, from + n) of the flat prefix [P, width].
  at::Tensor columns(std::int64_t from, std::int64_t n) {
    if (flat.defined()) return flat.narrow(1, from, n);
    auto h = torch::tanh(torch::linear(embedding, w1, b1));
    return torch::linear(h, w2.narrow(0, from, n), b2.narrow(0, from, n));
  }
  at::Tensor all() { return columns(0, width); }

  std::int64_t width;
  at::Tensor flat, embedding, w1, b1, w2, b2;
};

class LayerPrefix : public KvExtension {
 public:
  LayerPrefix(std::shared_ptr<PrefixStore> store, std::int64_t layer, std::int64_t heads,
              std::int64_t head_dim, std::int64_t P, const Config& c, std::int64_t d)
      : store_(std::move(store)),
        layer_(layer),
        heads_(heads),
        dim_(head_dim),
        P_(P),
        hub_(c.style == "adapterhub") {
    drop_ = register_module("dropout", torch::nn::Dropout(c.dropout));
    if (c.gating) gate_ = register_module("gate", torch::nn::Linear(d, c.shared_gating ? 1 : 2));
  }
  bool query_heads() const override { return hub_; }
  bool shifts_positions() const override { return !hub_; }
  std::pair<at::Tensor, at::Tensor> prefix(const at::Tensor& input) override {
    const auto batch = input.size(0), kv = heads_ * dim_;
    auto cols = store_->columns(2 * layer_ * kv, 2 * kv);  // [P, 2 kv]: keys then values
    if (drop_->options.p() > 0) cols = drop_(cols);
    auto kvs = cols.view({P_, 2, heads_, dim_}).permute({1, 2, 0, 3});  // [2, heads, P, dim]
    auto keys = kvs[0].unsqueeze(0).expand({batch, -1, -1, -1});
    auto values = kvs[1].unsqueeze(0).expand({batch, -1, -1, -1});
    if (gate_) {  // AdapterHub's gate: keys by its first output, values by its last
      auto g = torch::sigmoid(gate_(input.to(gate_->weight.dtype()))).mean(1);  // [batch, 1|2]
      keys = keys * g.select(1, 0).view({batch, 1, 1, 1}).to(keys.dtype());
      values = values * g.select(1, g.size(1) - 1).view({batch, 1, 1, 1}).to(values.dtype());
    }
    return {keys, values};
  }
  std::int64_t length() const override { return P_; }

 private:
  std::shared_ptr<PrefixStore> store_;
  std::int64_t layer_, heads_, dim_, P_;
  bool hub_;
  torch::nn::Dropout drop_{nullptr};
  torch::nn::Linear gate_{nullptr};
};

class PrefixTuning : public HookMethod {
 public:
  explicit PrefixTuning(const Params& p) {
    check_method_keys(p, {"num_virtual_tokens", "bottleneck", "flat", "dropout", "gating",
                          "shared_gating", "style"});
    c_.num_virtual_tokens = p.get_positive_int("num_virtual_tokens", c_.num_virtual_tokens);
    c_.bottleneck = p.get_positive_int("bottleneck", c_.bottleneck);
    c_.flat = p.get_bool("flat", c_.flat);
    if (p.has("dropout")) c_.dropout = p.at("dropout").as_probability();
    c_.gating = p.get_bool("gating", false);
    c_.shared_gating = p.get_bool("shared_gating", true);
    c_.style = p.get_choice("style", {"peft", "adapterhub"}, c_.style);
    if (p.has("targets") || p.has("layers") || p.has("leave_out"))
      p.fail(
          "prefix_tuning prefixes every layer's keys and values (as peft does); targets, "
          "layers and leave_out do not apply");
  }
  std::string name() const override { return "prefix_tuning"; }
  /// The settings of the saved form: the state is the flat tensor, so it reloads as flat: true.
  nlohmann::json config() const override {
    return {{"num_virtual_tokens", c_.num_virtual_tokens},
            {"bottleneck", c_.bottleneck},
            {"flat", true},
            {"dropout", c_.dropout},
            {"gating", c_.gating},
            {"shared_gating", c_.shared_gating},
            {"style", c_.style}};
  }

  void attach(Model& model) override {
    const auto& mc = model.config();
    if (c_.style == "peft" && mc.max_positions > 0 && c_.num_virtual_tokens > mc.max_positions)
      throw Error("prefix_tuning: num_virtual_tokens " + std::to_string(c_.num_virtual_tokens) +
                  " is more than the " + std::to_string(mc.max_positions) +
                  " positions this model has");
    const auto heads = c_.style == "adapterhub" ? mc.num_heads : mc.num_kv_heads;
    store_ = std::make_shared<PrefixStore>(c_, mc.hidden_size, mc.num_layers, heads * mc.head_dim);
    store_->to(model.parameters().front().device());
    for (std::int64_t l = 0; l < mc.num_layers; ++l)
      add_hook(model, "layers." + std::to_string(l) + ".attn.kv",
               std::make_shared<LayerPrefix>(store_, l, heads, mc.head_dim, c_.num_virtual_tokens,
                                             c_, mc.hidden_size));
  }
  void detach(Model& model) override {
    HookMethod::detach(model);
    store_.reset();
  }
  void set_training(bool on) override {
    HookMethod::set_training(on);
    if (store_) store_->train(on);
  }

  /// The MLP (or flat tensor) once, and each layer's gate when gating.
  std::vector<std::pair<std::string, at::Tensor>> trainable_parameters() override {
    auto out = HookMethod::trainable_parameters();
    for (const auto& p : attached().named_parameters(false)) out.emplace_back(p.key(), p.value());
    return out;
  }
  /// Only the flat tensor is saved (as peft does), with the gates when gating.
  io::TensorMap state() override {
    auto out = HookMethod::state();
    out["prefix"] = attached().all();
    return out;
  }
  void load_state(const io::TensorMap& full, const std::string& source) override {
    auto state = full;
    auto it = state.find("prefix");
    if (it == state.end()) throw FileError(source, "prefix_tuning: missing tensor 'prefix'");
    auto& s = attached();
    const std::vector<std::int64_t> shape = {c_.num_virtual_tokens, s.width};
    if (it->second.sizes() != at::IntArrayRef(shape))
      throw FileError(source, "prefix_tuning: 'prefix' has shape " + c10::str(it->second.sizes()) +
                                  " but this model needs " + c10::str(shape));
    if (!s.flat.defined())
      throw FileError(source,
                      "prefix_tuning: a saved prefix loads into flat: true (the MLP "
                      "that produced it is not saved)");
    {
      torch::NoGradGuard no_grad;
      s.flat.copy_(it->second);
    }
    state.erase("prefix");
    HookMethod::load_state(state, source);
  }

  /// A checkpoint holds the MLP itself (the flat prefix cannot be turned back into it).
  void load_checkpoint_state(const io::TensorMap& all, const std::string& source) override {
    torch::NoGradGuard no_grad;
    for (auto& [name, t] : trainable_parameters()) {
      auto it = all.find("train." + name);
      if (it == all.end())
        throw FileError(source, "prefix_tuning: missing tensor 'train." + name + "'");
      t.copy_(it->second);
    }
  }

  const Config& settings() const { return c_; }

 private:
  PrefixStore& attached() {
    if (!store_) throw Error("prefix_tuning: not attached to a model");
    return *store_;
  }
  Config c_;
  std::shared_ptr<PrefixStore> store_;
};

bool detect_peft(const fs::path& dir) { return peft::is_adapter(dir, "PREFIX_TUNING"); }

// peft's config for a model with grouped-query attention counts key/value heads: token_dim is
// kv_heads * head_dim and num_attention_heads is kv_heads.
std::vector<std::unique_ptr<Method>> read_peft(const fs::path& dir, Model& model) {
  const auto cfg_path = (dir / "adapter_config.json").string();
  const auto where = peft::tensors_path(dir);
  const auto cfg = peft::read_config(dir);
  // The tensor's shape answers the sizes; the projection's output is what peft saves.
  peft::check_config(
      cfg, cfg_path,
      {"num_virtual_tokens", "token_dim", "num_transformer_submodules", "num_attention_heads",
       "num_layers", "encoder_hidden_size", "prefix_projection"});
  auto tensors = peft::read_tensors(dir);
  const auto& c = model.config();
  auto it = tensors.find("prompt_embeddings");
  if (it == tensors.end()) throw FileError(where, "has no 'prompt_embeddings' tensor");
  const auto kv = c.num_kv_heads * c.head_dim;
  const auto& t = it->second;
  if (t.dim() != 2 || t.size(1) != c.num_layers * 2 * kv)
    throw FileError(where, "'prompt_embeddings' has shape " + c10::str(t.sizes()) + "; this " +
                               c.family + " model needs [P, " +
                               std::to_string(c.num_layers * 2 * kv) + "] (layers * 2 * " +
                               std::to_string(kv) + ")");
  if (cfg.value("num_transformer_submodules", 1) != 1)
    throw FileError(cfg_path, "num_transformer_submodules is not 1 (an encoder-decoder adapter)");
  const Source src{cfg_path, 0, 0};
  auto settings = Params::map("", src);
  settings.set("num_virtual_tokens",
               Params::scalar(std::to_string(t.size(0)), "num_virtual_tokens", src));
  settings.set("flat", Params::scalar("true", "prefix_projection", src));
  auto method = std::make_unique<PrefixTuning>(settings);
  method->attach(model);
  method->load_state({{"prefix", t}}, where);
  tensors.erase(it);
  std::vector<std::unique_ptr<Method>> methods;
  methods.push_back(std::move(method));
  peft_shared::read(tensors, model, where, methods);
  return methods;
}

void write_peft(const std::vector<Method*>& methods, const Model& model, const fs::path& dir) {
  auto* prefix = dynamic_cast<PrefixTuning*>(methods.at(0));
  if (!prefix) throw Error("peft format: not a prefix_tuning method");
  if (prefix->settings().gating)
    throw Error("peft format: prefix_tuning with gating (UniPELT) has no peft equivalent");
  if (prefix->settings().style != "peft")
    throw Error(
        "peft format: prefix_tuning in AdapterHub's style (a prefix per query head, "
        "positions not shifted) has no peft equivalent; export it as adapters");
  const auto& c = model.config();
  const auto flat = prefix->state().at("prefix").detach().to(torch::kFloat).contiguous();
  auto saved = peft_shared::write(methods, model, {}, peft_shared::Extras::prompt_learning);
  saved.tensors["prompt_embeddings"] = flat;
  // Saved flat, the MLP is gone: prefix_projection false, as peft's own saved adapters read.
  auto cfg = peft_shared::config("PREFIX_TUNING", model, saved);
  cfg.update({{"num_virtual_tokens", flat.size(0)},
              {"token_dim", c.num_kv_heads * c.head_dim},
              {"num_transformer_submodules", 1},
              {"num_attention_heads", c.num_kv_heads},
              {"num_layers", c.num_layers},
              {"encoder_hidden_size", prefix->settings().bottleneck},
              {"prefix_projection", false}});
  peft::write_adapter(dir, cfg, saved.tensors);
}

// AdapterHub's PrefixTuningConfig: "<base>prefix_tuning.prefix_tunings.<name>.self_prefix." holds
// wte.weight [P, d] and control_trans.{0,2}.{weight,bias} (the MLP), or with flat: true one
// control_trans [P * layers * 2 * d]; a gate per layer at
// "<attention>.prefix_tuning.prefix_gates.<name>.{weight,bias}". The MLP's output is the flat
// prefix graft keeps (computed here once, as AdapterHub computes it on every forward).
bool reads_hub_part(const nlohmann::json& part) {
  return part.value("architecture", nlohmann::json()) == "prefix_tuning";
}

at::Tensor hub_activation(const at::Tensor& x, const std::string& f, const std::string& source) {
  if (f == "tanh") return torch::tanh(x);
  if (f == "relu") return torch::relu(x);
  if (f == "gelu") return torch::gelu(x);
  if (f == "swish" || f == "silu") return torch::silu(x);
  throw FileError(source, "prefix tuning non_linearity \"" + f + "\" is not implemented");
}

std::string pool_key(const Model& model, const std::string& name) {
  return adapterhub::base_prefix(model.config()) + "prefix_tuning.prefix_tunings." + name +
         ".self_prefix.";
}
std::string gate_key(const Model& model, std::int64_t layer, const std::string& name) {
  return adapterhub::attention_module(model.config(), layer) + ".prefix_tuning.prefix_gates." +
         name + ".";
}

std::vector<std::unique_ptr<Method>> read_hub_part(const nlohmann::json& part,
                                                   const std::string& name, io::TensorMap& tensors,
                                                   Model& model, const std::string& source) {
  adapterhub::check_part(part, source,
                         {"prefix_length", "bottleneck_size", "flat", "non_linearity",
                          "encoder_prefix", "cross_prefix", "use_gating", "shared_gating"});
  if (part.value("encoder_prefix", true) != true)
    throw FileError(source,
                    "encoder_prefix false (no prefix in the encoder's self-attention) is "
                    "not implemented");
  const auto& mc = model.config();
  const auto P = part.value("prefix_length", nlohmann::json());
  if (!P.is_number_integer() || P.get<std::int64_t>() < 1)
    throw FileError(source, "prefix_length " + P.dump() + " is not a positive integer");
  const auto T = P.get<std::int64_t>();
  const auto width = mc.num_layers * 2 * mc.num_heads * mc.head_dim;
  const auto key = pool_key(model, name);
  at::Tensor flat;
  if (part.value("flat", false) == true) {
    flat = adapterhub::take(tensors, key + "control_trans", source);
    if (flat.numel() != T * width)
      throw FileError(source, "'" + key + "control_trans' has " + std::to_string(flat.numel()) +
                                  " values; prefix_length " + std::to_string(T) +
                                  " on this model needs " + std::to_string(T * width));
    flat = flat.reshape({T, width});
  } else {
    const auto wte = adapterhub::take(tensors, key + "wte.weight", source);
    const auto w1 = adapterhub::take(tensors, key + "control_trans.0.weight", source);
    const auto b1 = adapterhub::take(tensors, key + "control_trans.0.bias", source);
    const auto w2 = adapterhub::take(tensors, key + "control_trans.2.weight", source);
    const auto b2 = adapterhub::take(tensors, key + "control_trans.2.bias", source);
    if (wte.dim() != 2 || wte.size(0) != T || w2.size(0) != width)
      throw FileError(source, "the prefix MLP's shapes (wte " + c10::str(wte.sizes()) +
                                  ", output " + c10::str(w2.sizes()) +
                                  ") do not fit prefix_length " + std::to_string(T) +
                                  " on this model (output width " + std::to_string(width) + ")");
    torch::NoGradGuard no_grad;
    const auto f = part.value("non_linearity", std::string("tanh"));
    flat = torch::linear(hub_activation(torch::linear(wte, w1, b1), f, source), w2, b2);
  }
  const bool gating = part.value("use_gating", false) == true;
  const Source where{source, 0, 0};
  auto settings = Params::map("", where);
  auto set = [&](const std::string& k, const std::string& v, const std::string& origin) {
    settings.set(k, Params::scalar(v, origin, where));
  };
  set("num_virtual_tokens", std::to_string(T), "prefix_length");
  set("flat", "true", "flat");
  set("style", "adapterhub", "architecture");
  set("gating", gating ? "true" : "false", "use_gating");
  set("shared_gating", part.value("shared_gating", true) == true ? "true" : "false",
      "shared_gating");
  io::TensorMap state = {{"prefix", flat}};
  if (gating)
    for (std::int64_t l = 0; l < mc.num_layers; ++l)
      for (const std::string t : {"weight", "bias"})
        state["layers." + std::to_string(l) + ".attn.kv.gate." + t] =
            adapterhub::take(tensors, gate_key(model, l, name) + t, source);
  return adapterhub::attach_part(std::make_unique<PrefixTuning>(settings), model, source,
                                 [&](Method&) { return state; });
}

std::pair<nlohmann::json, io::TensorMap> write_hub_part(Method& method, const Model& model,
                                                        const std::string& name) {
  auto* prefix = dynamic_cast<PrefixTuning*>(&method);
  if (!prefix) throw Error(method.name() + ": not a prefix_tuning method");
  const auto& c = prefix->settings();
  if (c.style != "adapterhub")
    throw Error(
        "adapters format: prefix_tuning in peft's style (a prefix per key/value head, "
        "positions shifted) has no AdapterHub equivalent; train with style: adapterhub");
  const auto state = method.state();
  io::TensorMap out;
  out[pool_key(model, name) + "control_trans"] = state.at("prefix").reshape({-1});
  if (c.gating)
    for (std::int64_t l = 0; l < model.config().num_layers; ++l)
      for (const std::string t : {"weight", "bias"})
        out[gate_key(model, l, name) + t] =
            state.at("layers." + std::to_string(l) + ".attn.kv.gate." + t);
  nlohmann::json part = {{"architecture", "prefix_tuning"},
                         {"prefix_length", c.num_virtual_tokens},
                         {"flat", true},
                         {"bottleneck_size", c.bottleneck},
                         {"non_linearity", "tanh"},
                         {"encoder_prefix", true},
                         {"cross_prefix", true},
                         {"leave_out", nlohmann::json::array()},
                         {"dropout", c.dropout},
                         {"use_gating", c.gating},
                         {"shared_gating", c.shared_gating}};
  return {part, out};
}

void register_prefix_tuning(Registry& registry) {
  MethodInfo info;
  info.name = "prefix_tuning";
  info.version = "1.0.0";
  info.description = "learned key/value prefixes in every layer (MLP-reparameterised in training)";
  info.points = {"attn.kv"};
  registry.add(info, [](const Params& p) -> std::unique_ptr<Method> {
    return std::make_unique<PrefixTuning>(p);
  });
  registry.add_format({"peft", "prefix_tuning", detect_peft, read_peft, write_peft, {}, {}, {}});
  registry.add_format(
      adapterhub::part_format("prefix_tuning", reads_hub_part, read_hub_part, write_hub_part));
}

}  // namespace
}  // namespace graft::plugins::prefix_tuning

GRAFT_PLUGIN("prefix_tuning", "1.0.0", graft::plugins::prefix_tuning::register_prefix_tuning)
