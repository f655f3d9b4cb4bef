// IA3's method and its Hugging Face peft format.
#pragma once

#include <graft/method.h>
#include <torch/torch.h>

#include <filesystem>

namespace graft::plugins::ia3 {

/// A learned vector, initialised to ones, scaling a projection's output (attn.k, attn.v) or its
/// input (ffn.down: the feed-forward activation).
class Ia3Scale : public LinearScale {
 public:
  Ia3Scale(std::int64_t width, Side side) : side_(side) {
    ia3 = register_parameter("ia3", torch::ones({width}));
  }
  Side side() const override { return side_; }
  at::Tensor scale() override { return ia3; }
  at::Tensor ia3;

 private:
  Side side_;
};

struct Ia3Config {
  Selection selection;                   ///< default attn.k, attn.v, ffn.down
  std::vector<std::string> feedforward;  ///< targets whose input is scaled; default ffn.down
  static Ia3Config from_params(const Params& p);
  nlohmann::json to_json() const;
};

class Ia3 : public HookMethod {
 public:
  explicit Ia3(Ia3Config c) : c_(std::move(c)) {}
  std::string name() const override { return "ia3"; }
  nlohmann::json config() const override { return c_.to_json(); }
  void attach(Model& model) override;
  const std::vector<std::pair<std::string, std::shared_ptr<Hook>>>& hooks() const {
    return hook_list();
  }

 private:
  Ia3Config c_;
};

/// AdapterHub's IA3 (its LoRA architecture in scale mode), as parts of its adapters.
bool reads_hub_part(const nlohmann::json& part);
std::vector<std::unique_ptr<Method>> read_hub_part(const nlohmann::json& part,
                                                   const std::string& name, io::TensorMap& tensors,
                                                   Model& model, const std::string& source);
std::pair<nlohmann::json, io::TensorMap> write_hub_part(Method& method, const Model& model,
                                                        const std::string& name);

bool detect_peft(const std::filesystem::path& dir);
std::vector<std::unique_ptr<Method>> read_peft(const std::filesystem::path& dir, Model& model);
void write_peft(const std::vector<Method*>& methods, const Model& model,
                const std::filesystem::path& dir);

}  // namespace graft::plugins::ia3
