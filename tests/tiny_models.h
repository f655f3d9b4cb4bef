// Tiny models of every family with reproducible random weights, for tests that need no real
// checkpoint.
#pragma once

#include <graft/model.h>
#include <torch/torch.h>

#include <memory>
#include <string>

#include "models/common.h"
#include "models/families.h"

namespace graft::test {

inline ModelConfig tiny_config(const std::string& family) {
  ModelConfig c;
  c.family = family;
  c.vocab_size = 40;
  c.hidden_size = 16;
  c.num_layers = 2;
  c.num_heads = 4;
  c.num_kv_heads = family == "llama" ? 2 : 4;
  c.head_dim = 4;
  c.intermediate_size = 24;
  c.max_positions = 64;
  c.norm_eps = 1e-5;
  c.hidden_act = family == "llama" ? "silu" : family == "gpt2" ? "gelu_new" : "gelu";
  c.rope_style = RopeStyle::half_split;
  c.attention_bias = family != "llama";
  if (family == "bert") {
    c.architecture = "BertForSequenceClassification";
    c.type_vocab_size = 2;
    c.num_labels = 3;
    c.classifier = "pooler";
    c.pad_token_id = 0;
    c.norm_eps = 1e-12;
  }
  return c;
}

/// A tiny model with weights N(0, std) from `seed`, in eval mode, parameters frozen.
inline std::shared_ptr<Model> tiny_model(const std::string& family, std::uint64_t seed = 1,
                                         double std = 0.3) {
  auto m = models::make_model(tiny_config(family));
  models::init_parameters(*m, seed, std);
  m->eval();
  for (auto& p : m->parameters()) p.set_requires_grad(false);
  return m;
}

/// A SentencePiece vocabulary of `size` pieces for a tiny model (<unk>, <s>, </s>, then "p3",
/// "p4", ...), so that it can be written where a tokenizer is required (GGUF files).
inline std::shared_ptr<Tokenizer> toy_tokenizer(std::int64_t size) {
  SentencePieceVocab v;
  for (std::int64_t i = 0; i < size; ++i) {
    v.pieces.push_back(i == 0   ? "<unk>"
                       : i == 1 ? "<s>"
                       : i == 2 ? "</s>"
                                : "p" + std::to_string(i));
    v.scores.push_back(0.0f);
    v.types.push_back(i == 0 ? 2 : i < 3 ? 3 : 1);
  }
  v.unk = 0, v.bos = 1, v.eos = 2;
  return make_sentencepiece_bpe(std::move(v));
}

/// One forward pass without gradients: the logits, or the hidden states for models without a head.
inline at::Tensor model_outputs(Model& m, const at::Tensor& ids) {
  torch::NoGradGuard ng;
  auto out = m.forward({ids, {}, {}, {}}, nullptr);
  return out.logits.defined() ? out.logits : out.hidden;
}

}  // namespace graft::test
