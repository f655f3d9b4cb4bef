// The benchmarks' model: a llama of a given shape with random weights (seeded), in eval mode.
#pragma once

#include <graft/model.h>

#include <cstdint>
#include <memory>

#include "models/common.h"
#include "models/families.h"

namespace graft::bench {

inline std::shared_ptr<Model> random_llama(std::int64_t d, std::int64_t layers, std::int64_t heads,
                                           std::int64_t ffn, std::int64_t vocab,
                                           std::int64_t max_positions) {
  ModelConfig c;
  c.family = "llama";
  c.vocab_size = vocab;
  c.hidden_size = d;
  c.num_layers = layers;
  c.num_heads = c.num_kv_heads = heads;
  c.head_dim = d / heads;
  c.intermediate_size = ffn;
  c.max_positions = max_positions;
  c.hidden_act = "silu";
  auto model = models::make_model(c);
  models::init_parameters(*model, 1);
  model->eval();
  return model;
}

}  // namespace graft::bench
