#include "models/families.h"

#include <graft/error.h>
#include <torch/torch.h>

#include <cmath>
#include <limits>

#include "models/common.h"

namespace graft::models {

std::int64_t JsonConfig::integer(const std::string& key) const {
  if (!has(key)) throw FileError(source_, "missing \"" + key + "\"");
  if (!j_[key].is_number_integer())
    throw FileError(source_, key + ": expected an integer, got " + j_[key].dump());
  return j_[key].get<std::int64_t>();
}
std::int64_t JsonConfig::integer(const std::string& key, std::int64_t fallback) const {
  return has(key) ? integer(key) : fallback;
}
std::int64_t JsonConfig::size(const std::string& key) const {
  const auto v = integer(key);
  if (v < 1 || v > std::numeric_limits<std::int32_t>::max())
    throw FileError(source_, key + ": expected a positive size, got " + std::to_string(v));
  return v;
}
std::int64_t JsonConfig::size(const std::string& key, std::int64_t fallback) const {
  return has(key) ? size(key) : fallback;
}
double JsonConfig::number(const std::string& key, double fallback) const {
  if (!has(key)) return fallback;
  if (!j_[key].is_number())
    throw FileError(source_, key + ": expected a number, got " + j_[key].dump());
  return j_[key].get<double>();
}
bool JsonConfig::boolean(const std::string& key, bool fallback) const {
  if (!has(key)) return fallback;
  if (!j_[key].is_boolean())
    throw FileError(source_, key + ": expected true or false, got " + j_[key].dump());
  return j_[key].get<bool>();
}
std::string JsonConfig::string(const std::string& key, const std::string& fallback) const {
  if (!has(key)) return fallback;
  if (!j_[key].is_string())
    throw FileError(source_, key + ": expected a string, got " + j_[key].dump());
  return j_[key].get<std::string>();
}

std::string architecture_of(const nlohmann::json& j, const std::string& fallback) {
  if (j.contains("architectures") && j["architectures"].is_array() && !j["architectures"].empty() &&
      j["architectures"][0].is_string())
    return j["architectures"][0].get<std::string>();
  return fallback;
}

std::int64_t num_labels_of(const nlohmann::json& j, const std::string& source) {
  if (j.contains("id2label") && j["id2label"].is_object() && !j["id2label"].empty())
    return static_cast<std::int64_t>(j["id2label"].size());
  const auto n = JsonConfig(j, source).integer("num_labels", 2);
  if (n < 1)
    throw FileError(source, "num_labels: expected a positive integer, got " + std::to_string(n));
  return n;
}

void write_labels(nlohmann::json& j, const ModelConfig& c) {
  if (c.num_labels <= 0) return;
  j["id2label"] = nlohmann::json::object();
  j["label2id"] = nlohmann::json::object();
  for (std::int64_t i = 0; i < c.num_labels; ++i) {
    j["id2label"][std::to_string(i)] = "LABEL_" + std::to_string(i);
    j["label2id"]["LABEL_" + std::to_string(i)] = i;
  }
}

std::shared_ptr<Model> make_model(const ModelConfig& config) {
  if (config.family == "llama") return make_llama(config);
  if (config.family == "gpt2") return make_gpt2(config);
  if (config.family == "bert") return make_bert(config);
  throw Error("unknown model family \"" + config.family + "\" (graft has llama, bert, gpt2)");
}

void check_config(const ModelConfig& m, const std::string& source) {
  auto fail = [&](const std::string& what) { throw FileError(source, what); };
  // Each reader refuses sizes below 1; what remains are the relations the forward relies on.
  if (m.head_dim < 1)  // a width smaller than the number of heads, divided
    fail("the head size is " + std::to_string(m.head_dim) + ": " + std::to_string(m.num_heads) +
         " attention heads in a width of " + std::to_string(m.hidden_size));
  if (m.num_heads % m.num_kv_heads)
    fail(std::to_string(m.num_kv_heads) + " key/value heads do not divide the " +
         std::to_string(m.num_heads) + " attention heads");
  if (m.family != "llama" && m.num_heads * m.head_dim != m.hidden_size)
    fail(std::to_string(m.num_heads) + " attention heads do not divide the hidden size " +
         std::to_string(m.hidden_size));
  if (m.family == "llama" && m.head_dim % 2)
    fail("the head size " + std::to_string(m.head_dim) +
         " is odd; rotary embeddings rotate pairs of dimensions");
  if (!(m.norm_eps > 0) || !std::isfinite(m.norm_eps))
    fail("the norm epsilon must be a positive number, got " + std::to_string(m.norm_eps));
  if (m.family == "llama" && (!(m.rope_theta > 0) || !std::isfinite(m.rope_theta)))
    fail("the rotary base (rope_theta) must be a positive number, got " +
         std::to_string(m.rope_theta));
  if (m.sliding_window < 0) fail("a negative sliding window");
  if (!is_activation(m.hidden_act))
    fail("unsupported activation \"" + m.hidden_act + "\" (graft has silu, gelu, gelu_new, relu)");
}

ModelConfig config_from_hf(const nlohmann::json& j, const std::string& source) {
  if (!j.is_object()) throw FileError(source, "expected a JSON object");
  JsonConfig c(j, source);
  const auto type = c.string("model_type", "");
  ModelConfig m;
  if (type == "llama" || type == "mistral" || type == "qwen2")
    m = llama_config_from_hf(j, source);
  else if (type == "gpt2")
    m = gpt2_config_from_hf(j, source);
  else if (type == "bert" || type == "roberta")
    m = bert_config_from_hf(j, source);
  else
    throw FileError(source, "model_type \"" + type +
                                "\" is not supported (graft reads llama, mistral, qwen2, gpt2, "
                                "bert and roberta)");
  check_config(m, source);
  return m;
}

io::TensorMap from_hf(const ModelConfig& config, const io::TensorMap& checkpoint) {
  if (config.family == "llama") return llama_from_hf(config, checkpoint);
  if (config.family == "gpt2") return gpt2_from_hf(config, checkpoint);
  if (config.family == "bert") return bert_from_hf(config, checkpoint);
  throw Error("unknown model family \"" + config.family + "\"");
}

io::TensorMap to_hf(const ModelConfig& config, const io::TensorMap& tensors) {
  if (config.family == "llama") return llama_to_hf(config, tensors);
  if (config.family == "gpt2") return gpt2_to_hf(config, tensors);
  if (config.family == "bert") return bert_to_hf(config, tensors);
  throw Error("unknown model family \"" + config.family + "\"");
}

nlohmann::json hf_config(const ModelConfig& config) {
  if (config.family == "llama") return llama_hf_config(config);
  if (config.family == "gpt2") return gpt2_hf_config(config);
  if (config.family == "bert") return bert_hf_config(config);
  throw Error("unknown model family \"" + config.family + "\"");
}

}  // namespace graft::models

namespace graft {

at::Tensor permute_rope_rows(const at::Tensor& w, std::int64_t heads, RopeStyle from,
                             RopeStyle to) {
  if (from == to) return w;
  const auto rows = w.size(0), half = rows / heads / 2;
  auto rest = w.sizes().slice(1).vec();
  std::vector<std::int64_t> split = {heads, 2, half}, merged = {heads, half, 2};
  split.insert(split.end(), rest.begin(), rest.end());
  merged.insert(merged.end(), rest.begin(), rest.end());
  // half-split rows (h, pair half, i) -> interleaved rows (h, i, pair half), and back.
  auto v = from == RopeStyle::half_split ? w.reshape(split) : w.reshape(merged);
  return v.transpose(1, 2).reshape(w.sizes()).contiguous();
}

}  // namespace graft
