// KronA (Edalati et al. 2022) and peft's LoKr: delta W = s * (A ⊗ B) on linear sites, A: a1 x a2,
// B: b1 x b2, a1 b1 = out, a2 b2 = in. Either factor may itself be a rank-r product (peft's
// lokr_w1_a @ lokr_w1_b, lokr_w2_a @ lokr_w2_b). Shared by the registration (method.cpp) and
// peft's format (peft.cpp).
#pragma once

#include <graft/method.h>
#include <graft/params.h>
#include <torch/torch.h>

#include <filesystem>
#include <nlohmann/json.hpp>
#include <vector>

#include "../common/site_patterns.h"

namespace graft::plugins::krona {

/// One factor of the Kronecker product: a full matrix [rows, cols], or a rank-r product
/// [rows, r] @ [r, cols].
struct Factor {
  at::Tensor full, a, b;  ///< `full` alone, or `a` and `b`
  std::int64_t rows = 0, cols = 0;
  bool decomposed() const { return a.defined(); }
  at::Tensor value() const { return decomposed() ? torch::matmul(a, b) : full; }
};

/// delta = s * (A ⊗ B) x, applied as vec(A X B^T) with x viewed as X [a2, b2].
class KronaDelta : public LinearDelta {
 public:
  /// `rank_a` / `rank_b`: 0 for a full factor, else the rank of its product form. A starts
  /// Kaiming-uniform (both parts when decomposed), B at zero (its second part when decomposed).
  KronaDelta(std::int64_t a1, std::int64_t a2, std::int64_t b1, std::int64_t b2,
             std::int64_t rank_a, std::int64_t rank_b, double scaling);
  at::Tensor delta(const at::Tensor& x, const LinearImpl& site) override;
  at::Tensor delta_weight(const LinearImpl& site) override;

  Factor A, B;
  double scaling;
};

struct KronaConfig {
  std::vector<std::int64_t> a_shape;  ///< [a1, a2]; empty: from the factorisation below
  std::int64_t factor = -1;           ///< peft's decompose_factor: -1 near square roots
  std::int64_t r = 0;                 ///< 0: full factors; else peft's rule (see README)
  bool decompose_both = false;        ///< A, too, becomes a rank-r product (peft's rule)
  double scaling = 1.0;
  Selection selection;
  SitePatterns<std::int64_t> rank_pattern;
  SitePatterns<double> scaling_pattern;

  static KronaConfig from_params(const Params& p);
  nlohmann::json to_json() const;
};

class Krona : public HookMethod {
 public:
  Krona(KronaConfig c, Params where) : c_(std::move(c)), where_(std::move(where)) {}
  std::string name() const override { return "krona"; }
  nlohmann::json config() const override { return c_.to_json(); }
  void attach(Model& model) override;
  const KronaConfig& settings() const { return c_; }
  const std::vector<std::pair<std::string, std::shared_ptr<Hook>>>& hooks() const {
    return hook_list();
  }

 private:
  KronaConfig c_;
  Params where_;
};

/// The smaller of the factor pair of n nearest its square root, as peft's factorization()
/// chooses it: the largest divisor m <= sqrt(n), and m <= `factor` when `factor` is positive;
/// `factor` itself (or n / factor, the smaller) when it divides n.
std::int64_t small_factor(std::int64_t n, std::int64_t factor);

bool detect_peft(const std::filesystem::path& dir);
std::vector<std::unique_ptr<Method>> read_peft(const std::filesystem::path& dir, Model& model);
void write_peft(const std::vector<Method*>& methods, const Model& model,
                const std::filesystem::path& dir);

}  // namespace graft::plugins::krona
