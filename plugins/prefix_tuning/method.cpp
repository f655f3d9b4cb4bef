// Prefix tuning (Li and Liang 2021): per layer, P learned key and value vectors per key/value head
// are prepended to the attention's keys and values; the mask is extended and the real tokens'
// positions start after the prefix (as transformers does with peft's past_key_values). During
// training the prefix comes from a reparameterising MLP
//   Embedding(P, d) -> Linear(d, bottleneck) -> tanh -> Linear(bottleneck, layers * 2 * kv_dim)
// (`flat: true` trains the flat tensor directly); the adapter stores only the resulting flat
// tensor [P, layers * 2 * kv_dim], laid out as peft's prompt_embeddings: for each virtual token,
// layer l's keys at (2 l) * kv_dim and its values at (2 l + 1) * kv_dim, heads then head_dim.
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
  bool gating = false;  ///< UniPELT: scale the prefix's values by a gate read from the input
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
  LayerPrefix(std::shared_ptr<PrefixStore> store, std::int64_t layer, std::int64_t kv_heads,
              std::int64_t head_dim, std::int64_t P, const Config& c, std::int64_t d)
      : store_(std::move(store)), layer_(layer), heads_(kv_heads), dim_(head_dim), P_(P) {
    drop_ = register_module("dropout", torch::nn::Dropout(c.dropout));
    if (c.gating) gate_ = register_module("gate", torch::nn::Linear(d, 1));
  }
  std::pair<at::Tensor, at::Tensor> prefix(const at::Tensor& input) override {
    const auto batch = input.size(0), kv = heads_ * dim_;
    auto cols = store_->columns(2 * layer_ * kv, 2 * kv);  // [P, 2 kv]: keys then values
    if (drop_->options.p() > 0) cols = drop_(cols);
    auto kvs = cols.view({P_, 2, heads_, dim_}).permute({1, 2, 0, 3});  // [2, heads, P, dim]
    auto keys = kvs[0].unsqueeze(0).expand({batch, -1, -1, -1});
    auto values = kvs[1].unsqueeze(0).expand({batch, -1, -1, -1});
    if (gate_) {  // the prefix's share of the attention output, scaled per row
      auto g = torch::sigmoid(gate_(input.to(gate_->weight.dtype()))).mean(1);  // [batch, 1]
      values = values * g.view({batch, 1, 1, 1}).to(values.dtype());
    }
    return {keys, values};
  }
  std::int64_t length() const override { return P_; }

 private:
  std::shared_ptr<PrefixStore> store_;
  std::int64_t layer_, heads_, dim_, P_;
  torch::nn::Dropout drop_{nullptr};
  torch::nn::Linear gate_{nullptr};
};

class PrefixTuning : public HookMethod {
 public:
  explicit PrefixTuning(const Params& p) {
    check_method_keys(p, {"num_virtual_tokens", "bottleneck", "flat", "dropout", "gating"});
    c_.num_virtual_tokens = p.get_positive_int("num_virtual_tokens", c_.num_virtual_tokens);
    c_.bottleneck = p.get_positive_int("bottleneck", c_.bottleneck);
    c_.flat = p.get_bool("flat", c_.flat);
    if (p.has("dropout")) c_.dropout = p.at("dropout").as_probability();
    c_.gating = p.get_bool("gating", false);
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
            {"gating", c_.gating}};
  }

  void attach(Model& model) override {
    const auto& mc = model.config();
    if (mc.max_positions > 0 && c_.num_virtual_tokens > mc.max_positions)
      throw Error("prefix_tuning: num_virtual_tokens " + std::to_string(c_.num_virtual_tokens) +
                  " is more than the " + std::to_string(mc.max_positions) +
                  " positions this model has");
    const auto kv = mc.num_kv_heads * mc.head_dim;
    store_ = std::make_shared<PrefixStore>(c_, mc.hidden_size, mc.num_layers, kv);
    store_->to(model.parameters().front().device());
    for (std::int64_t l = 0; l < mc.num_layers; ++l)
      add_hook(model, "layers." + std::to_string(l) + ".attn.kv",
               std::make_shared<LayerPrefix>(store_, l, mc.num_kv_heads, mc.head_dim,
                                             c_.num_virtual_tokens, c_, mc.hidden_size));
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

void register_prefix_tuning(Registry& registry) {
  MethodInfo info;
  info.name = "prefix_tuning";
  info.version = "1.0.0";
  info.description = "learned key/value prefixes in every layer (MLP-reparameterised in training)";
  info.points = {"attn.kv"};
  registry.add(info, [](const Params& p) -> std::unique_ptr<Method> {
    return std::make_unique<PrefixTuning>(p);
  });
  registry.add_format({"peft", "prefix_tuning", detect_peft, read_peft, write_peft});
}

}  // namespace
}  // namespace graft::plugins::prefix_tuning

GRAFT_PLUGIN("prefix_tuning", "1.0.0", graft::plugins::prefix_tuning::register_prefix_tuning)
