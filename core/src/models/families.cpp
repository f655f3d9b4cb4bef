#include "models/families.h"

#include <graft/error.h>
#include <torch/torch.h>

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

ModelConfig config_from_hf(const nlohmann::json& j, const std::string& source) {
  if (!j.is_object()) throw FileError(source, "expected a JSON object");
  JsonConfig c(j, source);
  const auto type = c.string("model_type", "");
  if (type == "llama" || type == "mistral" || type == "qwen2")
    return llama_config_from_hf(j, source);
  if (type == "gpt2") return gpt2_config_from_hf(j, source);
  if (type == "bert" || type == "roberta") return bert_config_from_hf(j, source);
  throw FileError(source, "model_type \"" + type +
                              "\" is not supported (graft reads llama, mistral, qwen2, gpt2, bert "
                              "and roberta)");
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
