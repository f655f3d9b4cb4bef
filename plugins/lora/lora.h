// The LoRA method, shared by its registration (method.cpp) and its foreign formats (peft.cpp).
#pragma once

#include <graft/method.h>

#include <cmath>
#include <filesystem>
#include <map>

#include "config.h"

namespace graft::plugins::lora {

class Lora : public HookMethod {
 public:
  explicit Lora(LoraConfig c) : c_(std::move(c)) {}
  std::string name() const override { return "lora"; }
  nlohmann::json config() const override { return c_.to_json(); }
  void attach(Model& model) override;

  const LoraConfig& settings() const { return c_; }
  /// The (site, hook) pairs attached, in site order.
  const std::vector<std::pair<std::string, std::shared_ptr<Hook>>>& hooks() const {
    return hook_list();
  }
  /// s = alpha / r, or alpha / sqrt(r) with rslora (before the method's scale).
  double scaling(std::int64_t rank, double alpha) const {
    return c_.rslora ? alpha / std::sqrt(static_cast<double>(rank)) : alpha / rank;
  }
  void set_scale(double scale) override;

 private:
  LoraConfig c_;
  std::map<std::string, double> unscaled_;  // each site's scaling before the method's scale
};

// Hugging Face peft's format: adapter_config.json (peft_type "LORA") and
// adapter_model.safetensors with peft's module names for each family.
bool detect_peft(const std::filesystem::path& dir);
std::vector<std::unique_ptr<Method>> read_peft(const std::filesystem::path& dir, Model& model);
void write_peft(const std::vector<Method*>& methods, const Model& model,
                const std::filesystem::path& dir);

// AdapterHub's LoRA configurations (composition_mode "add"), as parts of its adapters.
bool reads_hub_part(const nlohmann::json& part);
std::vector<std::unique_ptr<Method>> read_hub_part(const nlohmann::json& part,
                                                   const std::string& name, io::TensorMap& tensors,
                                                   Model& model, const std::string& source);
std::pair<nlohmann::json, io::TensorMap> write_hub_part(Method& method, const Model& model,
                                                        const std::string& name);

// Several LoRA adapters made into one (graft combine; peft's add_weighted_adapter).
std::unique_ptr<Method> combine(const std::vector<Method*>& sources, const CombineOptions& options,
                                Model& model);

// llama.cpp's GGUF LoRA adapters, read and written.
bool detect_gguf_lora(const std::filesystem::path& file);
std::vector<std::unique_ptr<Method>> read_gguf_lora(const std::filesystem::path& file,
                                                    Model& model);
void write_gguf_lora(const std::vector<Method*>& methods, const Model& model,
                     const std::filesystem::path& file);

}  // namespace graft::plugins::lora
