// LoRA's settings, read from graft::Params.
#pragma once

#include <graft/method.h>
#include <graft/params.h>

#include <nlohmann/json.hpp>
#include <string>
#include <utility>
#include <vector>

#include "../common/site_patterns.h"

namespace graft::plugins::lora {

struct LoraConfig {
  std::int64_t r = 8;
  double alpha = 8;
  bool rslora = false;           ///< scaling alpha / sqrt(r) instead of alpha / r
  double dropout = 0.0;          ///< on the adapter's input, training only
  std::string init = "default";  ///< default: A Kaiming-uniform, B 0; gaussian: A ~ N(0, (1/r)^2)
  bool dora = false;             ///< weight-decomposed LoRA: a learned magnitude per output
  bool gating = false;  ///< UniPELT: scale the delta by sigmoid(Linear(in, 1)(x)), averaged
  double scale = 1.0;   ///< a multiplier on every site's scaling (llama.cpp's --lora-scaled)
  Selection selection;  ///< default targets attn.q and attn.v
  SitePatterns<std::int64_t> rank_pattern;  ///< per-site ranks
  SitePatterns<double> alpha_pattern;       ///< per-site alphas

  static LoraConfig from_params(const Params& p);
  nlohmann::json to_json() const;
  /// The rank and alpha for one site, after the patterns.
  std::pair<std::int64_t, double> rank_alpha(const Site& site) const;
};

}  // namespace graft::plugins::lora
