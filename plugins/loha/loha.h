// LoHa (Hyeon-Woo et al. 2022, FedPara; peft's LOHA): delta W = s * (W1a W1b) ⊙ (W2a W2b), the
// Hadamard product of two rank-r products, which reaches rank r^2 with the parameters of two
// rank-r LoRAs. Shared by the registration (method.cpp) and peft's format (peft.cpp).
#pragma once

#include <graft/method.h>
#include <graft/params.h>
#include <torch/torch.h>

#include <filesystem>
#include <nlohmann/json.hpp>
#include <utility>
#include <vector>

#include "../common/site_patterns.h"

namespace graft::plugins::loha {

/// W1a, W2a: [out, r]; W1b, W2b: [r, in] (peft's hada_w1_a ... hada_w2_b).
class LohaDelta : public LinearDelta {
 public:
  LohaDelta(std::int64_t in, std::int64_t out, std::int64_t r, double scaling);
  /// s * (W1a W1b) ⊙ (W2a W2b): [out, in].
  at::Tensor update() const;
  at::Tensor delta(const at::Tensor& x, const LinearImpl& site) override;
  at::Tensor delta_weight(const LinearImpl&) override { return update(); }

  at::Tensor w1_a, w1_b, w2_a, w2_b;
  double scaling;
};

struct LohaConfig {
  std::int64_t r = 8;
  double alpha = 8;  ///< s = alpha / r
  Selection selection;
  SitePatterns<std::int64_t> rank_pattern;  ///< per-site ranks
  SitePatterns<double> alpha_pattern;       ///< per-site alphas

  static LohaConfig from_params(const Params& p);
  nlohmann::json to_json() const;
};

class Loha : public HookMethod {
 public:
  explicit Loha(LohaConfig c) : c_(std::move(c)) {}
  std::string name() const override { return "loha"; }
  nlohmann::json config() const override { return c_.to_json(); }
  void attach(Model& model) override;
  const LohaConfig& settings() const { return c_; }
  const std::vector<std::pair<std::string, std::shared_ptr<Hook>>>& hooks() const {
    return hook_list();
  }

 private:
  LohaConfig c_;
};

bool detect_peft(const std::filesystem::path& dir);
std::vector<std::unique_ptr<Method>> read_peft(const std::filesystem::path& dir, Model& model);
void write_peft(const std::vector<Method*>& methods, const Model& model,
                const std::filesystem::path& dir);

}  // namespace graft::plugins::loha
