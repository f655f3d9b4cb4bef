// The model families and how their checkpoints map onto graft's parameter names.
#pragma once

#include <graft/io/gguf.h>
#include <graft/io/tensors.h>
#include <graft/model.h>

#include <memory>
#include <nlohmann/json.hpp>
#include <string>

namespace graft::models {

/// Builds an uninitialised model of `config.family`.
std::shared_ptr<Model> make_model(const ModelConfig& config);

/// Reads a Hugging Face config.json; `source` names the file in errors.
ModelConfig config_from_hf(const nlohmann::json& config, const std::string& source);
/// Reads a GGUF file's metadata (general.architecture llama, mistral or qwen2).
ModelConfig config_from_gguf(const io::GgufFile& file);

/// Converts Hugging Face checkpoint tensors to graft's parameter names and layouts.
io::TensorMap from_hf(const ModelConfig& config, const io::TensorMap& checkpoint);
/// Converts GGUF tensors to graft's parameter names.
io::TensorMap from_gguf(const ModelConfig& config, const io::TensorMap& tensors);

/// The other direction, for writing merged models: graft parameters to a Hugging Face
/// checkpoint (names, layouts, and q/k rows in the half-split RoPE order transformers uses) and
/// the config.json that describes it.
io::TensorMap to_hf(const ModelConfig& config, const io::TensorMap& tensors);
nlohmann::json hf_config(const ModelConfig& config);
/// graft parameters to GGUF tensor names, q/k rows in the interleaved RoPE order llama.cpp's
/// llama architecture uses (llama family only).
io::TensorMap to_gguf(const ModelConfig& config, const io::TensorMap& tensors);

// Per family.
std::shared_ptr<Model> make_llama(const ModelConfig& config);
std::shared_ptr<Model> make_gpt2(const ModelConfig& config);
std::shared_ptr<Model> make_bert(const ModelConfig& config);
ModelConfig llama_config_from_hf(const nlohmann::json& j, const std::string& source);
ModelConfig gpt2_config_from_hf(const nlohmann::json& j, const std::string& source);
ModelConfig bert_config_from_hf(const nlohmann::json& j, const std::string& source);
io::TensorMap llama_from_hf(const ModelConfig& c, const io::TensorMap& t);
io::TensorMap gpt2_from_hf(const ModelConfig& c, const io::TensorMap& t);
io::TensorMap bert_from_hf(const ModelConfig& c, const io::TensorMap& t);
io::TensorMap llama_to_hf(const ModelConfig& c, const io::TensorMap& t);
io::TensorMap gpt2_to_hf(const ModelConfig& c, const io::TensorMap& t);
io::TensorMap bert_to_hf(const ModelConfig& c, const io::TensorMap& t);
nlohmann::json llama_hf_config(const ModelConfig& c);
nlohmann::json gpt2_hf_config(const ModelConfig& c);
nlohmann::json bert_hf_config(const ModelConfig& c);

/// The architecture config.json names (its first "architectures" entry), or `fallback`.
std::string architecture_of(const nlohmann::json& j, const std::string& fallback);
/// The number of labels of a *ForSequenceClassification config: the size of id2label, else
/// num_labels, else 2 (transformers' default).
std::int64_t num_labels_of(const nlohmann::json& j, const std::string& source);
/// Writes id2label and label2id for `config.num_labels` labels (nothing when it has none).
void write_labels(nlohmann::json& j, const ModelConfig& config);

/// Reads config.json fields with clear errors ("config.json: num_attention_heads: expected an
/// integer").
/// Refuses, naming `source`, a configuration whose sizes the forward cannot use together (key/value
/// heads not dividing the heads, heads not dividing the width, an odd rotary head, a norm epsilon
/// or rotary base that is not a positive number). The readers call it.
void check_config(const ModelConfig& config, const std::string& source);

class JsonConfig {
 public:
  JsonConfig(const nlohmann::json& j, std::string source) : j_(j), source_(std::move(source)) {}
  std::int64_t integer(const std::string& key) const;
  std::int64_t integer(const std::string& key, std::int64_t fallback) const;
  /// A width, count or length: an integer from 1 to 2^31 - 1 (refused naming the key otherwise,
  /// before anything divides by it or allocates with it).
  std::int64_t size(const std::string& key) const;
  std::int64_t size(const std::string& key, std::int64_t fallback) const;
  double number(const std::string& key, double fallback) const;
  bool boolean(const std::string& key, bool fallback) const;
  std::string string(const std::string& key, const std::string& fallback) const;
  bool has(const std::string& key) const { return j_.contains(key) && !j_[key].is_null(); }
  const nlohmann::json& json() const { return j_; }
  const std::string& source() const { return source_; }

 private:
  const nlohmann::json& j_;
  std::string source_;
};

}  // namespace graft::models
