// Each family's forward on tiny models with random weights, checked against a naive per-token
// implementation written here in double precision with explicit loops, and checkpoint loading
// from Hugging Face folders and GGUF files written by the test.
#include <graft/error.h>
#include <graft/io/gguf.h>
#include <graft/io/safetensors.h>
#include <graft/load.h>
#include <graft/task_head.h>
#include <torch/torch.h>

#include <cmath>
#include <fstream>
#include <map>
#include <nlohmann/json.hpp>

#include "models/common.h"
#include "models/families.h"
#include "numeric.h"
#include "support.h"
#include "tiny_models.h"

using namespace graft;
using graft::test::TempDir;
using Vec = std::vector<double>;

namespace {

// Parameters as double vectors/matrices, by graft name.
struct Params {
  std::map<std::string, at::Tensor> p;
  explicit Params(Model& m) {
    for (const auto& kv : m.named_parameters(true))
      p[kv.key()] = kv.value().detach().to(torch::kDouble);
  }
  bool has(const std::string& n) const { return p.count(n) > 0; }
  Vec vec(const std::string& n) const {
    auto t = p.at(n).contiguous();
    return Vec(t.data_ptr<double>(), t.data_ptr<double>() + t.numel());
  }
  Vec row(const std::string& n, std::int64_t r) const {
    auto t = p.at(n)[r].contiguous();
    return Vec(t.data_ptr<double>(), t.data_ptr<double>() + t.numel());
  }
  // W x (+ b) with W: [out, in]
  Vec linear(const std::string& name, const Vec& x) const {
    const auto& w = p.at(name + ".weight");
    const auto out = w.size(0), in = w.size(1);
    auto wa = w.accessor<double, 2>();
    Vec y(out, 0.0);
    for (std::int64_t o = 0; o < out; ++o) {
      double s = 0;
      for (std::int64_t i = 0; i < in; ++i) s += wa[o][i] * x[i];
      y[o] = s;
    }
    if (has(name + ".bias")) {
      auto b = vec(name + ".bias");
      for (std::int64_t o = 0; o < out; ++o) y[o] += b[o];
    }
    return y;
  }
};

Vec add(Vec a, const Vec& b) {
  for (std::size_t i = 0; i < a.size(); ++i) a[i] += b[i];
  return a;
}

Vec rms_norm(const Vec& x, const Vec& w, double eps) {
  double ss = 0;
  for (double v : x) ss += v * v;
  const double r = 1.0 / std::sqrt(ss / x.size() + eps);
  Vec y(x.size());
  for (std::size_t i = 0; i < x.size(); ++i) y[i] = w[i] * x[i] * r;
  return y;
}

Vec layer_norm(const Vec& x, const Vec& w, const Vec& b, double eps) {
  double mean = 0, var = 0;
  for (double v : x) mean += v;
  mean /= x.size();
  for (double v : x) var += (v - mean) * (v - mean);
  var /= x.size();
  Vec y(x.size());
  for (std::size_t i = 0; i < x.size(); ++i)
    y[i] = (x[i] - mean) / std::sqrt(var + eps) * w[i] + b[i];
  return y;
}

// Rotates one head vector in place by position `pos`.
void rope(double* v, std::int64_t dim, double pos, double theta, RopeStyle style) {
  for (std::int64_t i = 0; i < dim / 2; ++i) {
    const double angle = pos * std::pow(theta, -2.0 * i / dim);
    const std::int64_t a = style == RopeStyle::interleaved ? 2 * i : i;
    const std::int64_t b = style == RopeStyle::interleaved ? 2 * i + 1 : i + dim / 2;
    const double x0 = v[a], x1 = v[b];
    v[a] = x0 * std::cos(angle) - x1 * std::sin(angle);
    v[b] = x0 * std::sin(angle) + x1 * std::cos(angle);
  }
}

// Attention of one query over the given keys/values (all of them allowed).
Vec attend_one(const Vec& q, const std::vector<Vec>& keys, const std::vector<Vec>& values,
               std::int64_t heads, std::int64_t kv_heads, std::int64_t dim) {
  Vec out(heads * dim, 0.0);
  for (std::int64_t h = 0; h < heads; ++h) {
    const std::int64_t g = h / (heads / kv_heads);
    std::vector<double> s(keys.size());
    double mx = -1e300;
    for (std::size_t j = 0; j < keys.size(); ++j) {
      double dot = 0;
      for (std::int64_t d = 0; d < dim; ++d) dot += q[h * dim + d] * keys[j][g * dim + d];
      s[j] = dot / std::sqrt(double(dim));
      mx = std::max(mx, s[j]);
    }
    double z = 0;
    for (auto& v : s) z += (v = std::exp(v - mx));
    for (std::size_t j = 0; j < keys.size(); ++j)
      for (std::int64_t d = 0; d < dim; ++d) out[h * dim + d] += s[j] / z * values[j][g * dim + d];
  }
  return out;
}

double gelu_tanh(double x) {
  return 0.5 * x * (1 + std::tanh(std::sqrt(2.0 / M_PI) * (x + 0.044715 * x * x * x)));
}
double gelu_erf(double x) { return 0.5 * x * (1 + std::erf(x / std::sqrt(2.0))); }

// A causal decoder run token by token: logits for the real (mask = 1) tokens of one row.
std::map<std::int64_t, Vec> naive_decoder(Model& m, const std::vector<std::int64_t>& ids,
                                          const std::vector<std::int64_t>& mask) {
  const auto& c = m.config();
  Params P(m);
  const bool llama = c.family == "llama";
  std::vector<std::vector<Vec>> K(c.num_layers), V(c.num_layers);
  std::map<std::int64_t, Vec> logits;
  std::int64_t pos = 0;
  for (std::size_t t = 0; t < ids.size(); ++t) {
    if (!mask[t]) continue;
    Vec x = P.row("embed.weight", ids[t]);
    if (!llama) x = add(x, P.row("pos_embed.weight", pos));
    for (std::int64_t l = 0; l < c.num_layers; ++l) {
      const std::string L = "layers." + std::to_string(l) + ".";
      Vec h = llama ? rms_norm(x, P.vec(L + "attn_norm.weight"), c.norm_eps)
                    : layer_norm(x, P.vec(L + "attn_norm.weight"), P.vec(L + "attn_norm.bias"),
                                 c.norm_eps);
      Vec q = P.linear(L + "attn.q", h), k = P.linear(L + "attn.k", h),
          v = P.linear(L + "attn.v", h);
      if (llama) {
        for (std::int64_t hh = 0; hh < c.num_heads; ++hh)
          rope(&q[hh * c.head_dim], c.head_dim, pos, c.rope_theta, c.rope_style);
        for (std::int64_t hh = 0; hh < c.num_kv_heads; ++hh)
          rope(&k[hh * c.head_dim], c.head_dim, pos, c.rope_theta, c.rope_style);
      }
      K[l].push_back(k);
      V[l].push_back(v);
      // Mistral's sliding window: only the latest `sliding_window` tokens are visible.
      const std::size_t first = c.sliding_window > 0 && K[l].size() > std::size_t(c.sliding_window)
                                    ? K[l].size() - c.sliding_window
                                    : 0;
      std::vector<Vec> keys(K[l].begin() + first, K[l].end());
      std::vector<Vec> values(V[l].begin() + first, V[l].end());
      x = add(x, P.linear(L + "attn.o",
                          attend_one(q, keys, values, c.num_heads, c.num_kv_heads, c.head_dim)));
      h = llama
              ? rms_norm(x, P.vec(L + "ffn_norm.weight"), c.norm_eps)
              : layer_norm(x, P.vec(L + "ffn_norm.weight"), P.vec(L + "ffn_norm.bias"), c.norm_eps);
      Vec a;
      if (llama) {
        Vec g = P.linear(L + "ffn.gate", h), u = P.linear(L + "ffn.up", h);
        for (std::size_t i = 0; i < g.size(); ++i) a.push_back(g[i] / (1 + std::exp(-g[i])) * u[i]);
      } else {
        for (double u : P.linear(L + "ffn.up", h)) a.push_back(gelu_tanh(u));
      }
      x = add(x, P.linear(L + "ffn.down", a));
    }
    x = llama ? rms_norm(x, P.vec("norm.weight"), c.norm_eps)
              : layer_norm(x, P.vec("norm.weight"), P.vec("norm.bias"), c.norm_eps);
    Vec out(c.vocab_size, 0.0);
    const std::string head = P.has("head.weight") ? "head.weight" : "embed.weight";
    for (std::int64_t o = 0; o < c.vocab_size; ++o) {
      auto w = P.row(head, o);
      for (std::int64_t i = 0; i < c.hidden_size; ++i) out[o] += w[i] * x[i];
    }
    logits[t] = out;
    ++pos;
  }
  return logits;
}

ModelConfig tiny_llama(RopeStyle style, bool bias, bool tied) {
  ModelConfig c;
  c.family = "llama";
  c.architecture = "LlamaForCausalLM";
  c.vocab_size = 37;
  c.hidden_size = 16;
  c.num_layers = 2;
  c.num_heads = 4;
  c.num_kv_heads = 2;
  c.head_dim = 4;
  c.intermediate_size = 24;
  c.max_positions = 64;
  c.norm_eps = 1e-5;
  c.rope_theta = 10000;
  c.rope_style = style;
  c.attention_bias = bias;
  c.tie_embeddings = tied;
  c.hidden_act = "silu";
  return c;
}

ModelConfig tiny_gpt2() {
  ModelConfig c;
  c.family = "gpt2";
  c.architecture = "GPT2LMHeadModel";
  c.vocab_size = 29;
  c.hidden_size = 12;
  c.num_layers = 2;
  c.num_heads = c.num_kv_heads = 3;
  c.head_dim = 4;
  c.intermediate_size = 48;
  c.max_positions = 32;
  c.hidden_act = "gelu_new";
  c.tie_embeddings = true;
  c.attention_bias = true;
  return c;
}

ModelConfig tiny_bert(bool roberta) {
  ModelConfig c;
  c.family = "bert";
  c.architecture = roberta ? "RobertaForSequenceClassification" : "BertForSequenceClassification";
  c.vocab_size = 31;
  c.hidden_size = 8;
  c.num_layers = 2;
  c.num_heads = c.num_kv_heads = 2;
  c.head_dim = 4;
  c.intermediate_size = 20;
  c.max_positions = 40;
  c.type_vocab_size = 2;
  c.norm_eps = 1e-12;
  c.hidden_act = "gelu";
  c.num_labels = 3;
  c.classifier = roberta ? "roberta" : "pooler";
  c.roberta_positions = roberta;
  c.pad_token_id = 1;
  c.attention_bias = true;
  return c;
}

std::shared_ptr<Model> build(const ModelConfig& c, std::uint64_t seed) {
  auto m = models::make_model(c);
  models::init_parameters(*m, seed, 0.3);
  m->eval();
  return m;
}

at::Tensor to_tensor(const std::vector<std::vector<std::int64_t>>& rows) {
  std::vector<std::int64_t> flat;
  for (const auto& r : rows) flat.insert(flat.end(), r.begin(), r.end());
  return torch::tensor(flat, torch::kLong).view({static_cast<std::int64_t>(rows.size()), -1});
}

void check_decoder_against_naive(Model& m) {
  torch::NoGradGuard ng;
  // Row 0 unpadded, row 1 right-padded, row 2 left-padded.
  std::vector<std::vector<std::int64_t>> ids = {
      {3, 7, 1, 9, 4, 2}, {5, 6, 8, 0, 0, 0}, {0, 0, 11, 12, 13, 14}};
  std::vector<std::vector<std::int64_t>> mask = {
      {1, 1, 1, 1, 1, 1}, {1, 1, 1, 0, 0, 0}, {0, 0, 1, 1, 1, 1}};
  auto out = m.forward({to_tensor(ids), to_tensor(mask), {}, {}}, nullptr);
  REQUIRE(out.logits.sizes() == c10::IntArrayRef({3, 6, m.config().vocab_size}));
  // The naive implementation runs in double: the model's float32 result is within the bound of
  // one evaluation of its sums.
  const double tolerance =
      graft::test::reorder_tolerance(out.logits, graft::test::forward_terms(m.config(), 6));
  for (std::size_t b = 0; b < ids.size(); ++b) {
    for (const auto& [t, expected] : naive_decoder(m, ids[b], mask[b])) {
      auto got = out.logits[b][t].to(torch::kDouble);
      double err = 0;
      for (std::int64_t v = 0; v < m.config().vocab_size; ++v)
        err = std::max(err, std::abs(got[v].item<double>() - expected[v]));
      CHECK_MESSAGE(err <= tolerance, "row " << b << " token " << t << " max error " << err
                                             << " above " << tolerance);
    }
  }
}

void check_same_outputs(Model& a, Model& b) {
  torch::NoGradGuard ng;
  auto ids = to_tensor({{2, 4, 6, 8, 1}, {3, 3, 5, 0, 0}});
  auto mask = to_tensor({{1, 1, 1, 1, 1}, {1, 1, 1, 0, 0}});
  auto types = to_tensor({{0, 0, 1, 1, 1}, {0, 1, 1, 0, 0}});
  ForwardInput in{ids, mask, a.config().family == "bert" ? types : at::Tensor(), {}};
  auto x = a.forward(in, nullptr), y = b.forward(in, nullptr);
  // The same weights, possibly with q/k rows in another order (other sums in the attention).
  const auto terms = graft::test::forward_terms(a.config(), 5);
  GRAFT_CHECK_CLOSE(x.hidden, y.hidden, graft::test::reorder_tolerance(x.hidden, terms));
  if (x.logits.defined())
    GRAFT_CHECK_CLOSE(x.logits, y.logits, graft::test::reorder_tolerance(x.logits, terms));
}

void write_json(const std::filesystem::path& p, const nlohmann::json& j) {
  std::ofstream(p) << j.dump(2);
}

}  // namespace

TEST_CASE("llama forward equals a naive per-token implementation") {
  SUBCASE("interleaved RoPE, grouped-query attention, untied head") {
    check_decoder_against_naive(*build(tiny_llama(RopeStyle::interleaved, false, false), 1));
  }
  SUBCASE("half-split RoPE, q/k/v biases (Qwen2), tied head") {
    check_decoder_against_naive(*build(tiny_llama(RopeStyle::half_split, true, true), 2));
  }
  SUBCASE("sliding-window attention (Mistral)") {
    auto c = tiny_llama(RopeStyle::half_split, false, false);
    c.sliding_window = 3;
    check_decoder_against_naive(*build(c, 12));
  }
}

TEST_CASE("gpt2 forward equals a naive per-token implementation") {
  check_decoder_against_naive(*build(tiny_gpt2(), 3));
}

TEST_CASE("bert forward equals a naive implementation, with padding, token types and heads") {
  for (bool roberta : {false, true}) {
    CAPTURE(roberta);
    auto m = build(tiny_bert(roberta), 4);
    const auto& c = m->config();
    Params P(*m);
    std::vector<std::vector<std::int64_t>> ids = {{2, 5, 7, 9, 3}, {2, 6, 3, 1, 1}};
    std::vector<std::vector<std::int64_t>> mask = {{1, 1, 1, 1, 1}, {1, 1, 1, 0, 0}};
    std::vector<std::vector<std::int64_t>> types = {{0, 0, 0, 1, 1}, {0, 1, 1, 0, 0}};
    torch::NoGradGuard ng;
    auto out = m->forward({to_tensor(ids), to_tensor(mask), to_tensor(types), {}}, nullptr);
    // Against the double-precision implementation: one float32 evaluation's bound.
    const auto terms = graft::test::forward_terms(c, 5);
    const double hidden_tol = graft::test::reorder_tolerance(out.hidden, terms);
    const double pooled_tol =
        out.pooled.defined() ? graft::test::reorder_tolerance(out.pooled, terms + c.hidden_size)
                             : 0.0;
    const double logits_tol = graft::test::reorder_tolerance(out.logits, terms + 2 * c.hidden_size);
    for (std::size_t b = 0; b < ids.size(); ++b) {
      const std::size_t n = ids[b].size();
      std::vector<Vec> x(n);
      std::int64_t real = 0;
      for (std::size_t t = 0; t < n; ++t) {
        // BERT numbers positions 0..n-1; RoBERTa from pad + 1 over real tokens, pad for padding.
        std::int64_t pos =
            roberta ? (mask[b][t] ? c.pad_token_id + 1 + real++ : c.pad_token_id) : t;
        x[t] = add(add(P.row("embed.weight", ids[b][t]), P.row("pos_embed.weight", pos)),
                   P.row("type_embed.weight", types[b][t]));
        x[t] = layer_norm(x[t], P.vec("embed_norm.weight"), P.vec("embed_norm.bias"), c.norm_eps);
      }
      for (std::int64_t l = 0; l < c.num_layers; ++l) {
        const std::string L = "layers." + std::to_string(l) + ".";
        std::vector<Vec> keys, values;
        for (std::size_t t = 0; t < n; ++t)
          if (mask[b][t]) {
            keys.push_back(P.linear(L + "attn.k", x[t]));
            values.push_back(P.linear(L + "attn.v", x[t]));
          }
        std::vector<Vec> next(n);
        for (std::size_t t = 0; t < n; ++t) {
          auto a = attend_one(P.linear(L + "attn.q", x[t]), keys, values, c.num_heads, c.num_heads,
                              c.head_dim);
          auto h = layer_norm(add(x[t], P.linear(L + "attn.o", a)), P.vec(L + "attn_norm.weight"),
                              P.vec(L + "attn_norm.bias"), c.norm_eps);
          Vec u;
          for (double v : P.linear(L + "ffn.up", h)) u.push_back(gelu_erf(v));
          next[t] = layer_norm(add(h, P.linear(L + "ffn.down", u)), P.vec(L + "ffn_norm.weight"),
                               P.vec(L + "ffn_norm.bias"), c.norm_eps);
        }
        x = next;
      }
      for (std::size_t t = 0; t < n; ++t) {
        if (!mask[b][t]) continue;
        for (std::int64_t i = 0; i < c.hidden_size; ++i)
          CHECK(std::abs(out.hidden[b][t][i].item<double>() - x[t][i]) <= hidden_tol);
      }
      Vec logits;
      if (roberta) {
        Vec d = P.linear("head_dense", x[0]);
        for (auto& v : d) v = std::tanh(v);
        logits = P.linear("head", d);
      } else {
        Vec pooled = P.linear("pooler", x[0]);
        for (auto& v : pooled) v = std::tanh(v);
        for (std::int64_t i = 0; i < c.hidden_size; ++i)
          CHECK(std::abs(out.pooled[b][i].item<double>() - pooled[i]) <= pooled_tol);
        logits = P.linear("head", pooled);
      }
      REQUIRE(out.logits.sizes() == c10::IntArrayRef({2, c.num_labels}));
      for (std::int64_t k = 0; k < c.num_labels; ++k)
        CHECK(std::abs(out.logits[b][k].item<double>() - logits[k]) <= logits_tol);
    }
  }
}

TEST_CASE("every family enumerates its sites with stable names") {
  auto llama = build(tiny_llama(RopeStyle::half_split, true, false), 5);
  std::map<std::string, Site> by_name;
  for (const auto& s : llama->sites()) by_name[s.name] = s;
  for (const auto* name :
       {"embed", "layers.0.attn.in", "layers.1.attn.q", "layers.1.attn.k", "layers.0.attn.kv",
        "layers.0.attn.o", "layers.0.attn.out", "layers.0.ffn.in", "layers.0.ffn.gate",
        "layers.0.ffn.up", "layers.0.ffn.act", "layers.0.ffn.down", "layers.0.ffn.out",
        "layers.0.attn_norm", "layers.0.attn.q.bias", "norm", "head"})
    CHECK_MESSAGE(by_name.count(name), name);
  CHECK(by_name["layers.1.attn.k"].out_features == 8);  // 2 kv heads x 4
  CHECK(by_name["layers.1.attn.k"].layer == 1);
  CHECK(by_name["layers.0.ffn.down"].in_features == 24);
  for (const auto& s : llama->sites())
    CHECK_MESSAGE(
        std::find(site_points().begin(), site_points().end(), s.point) != site_points().end(),
        s.point);
  // Every linear site names a graft::Linear module at the same path.
  auto modules = llama->named_modules();
  for (const auto& s : llama->sites())
    if (s.point == "attn.q" || s.point == "ffn.down" || s.point == "head") {
      REQUIRE(modules.contains(s.name));
      CHECK(dynamic_cast<LinearImpl*>(modules[s.name].get()) != nullptr);
    }
  auto gpt2 = build(tiny_gpt2(), 6);
  auto bert = build(tiny_bert(false), 7);
  CHECK(gpt2->sites().size() > 10);
  bool has_gate = false;
  for (const auto& s : bert->sites()) has_gate |= s.point == "ffn.gate";
  CHECK_FALSE(has_gate);
}

TEST_CASE("Hugging Face folders load with identical outputs") {
  TempDir dir;
  SUBCASE("llama (LlamaForCausalLM naming, untied)") {
    auto src = build(tiny_llama(RopeStyle::half_split, false, false), 8);
    const auto& c = src->config();
    io::TensorMap hf;
    for (const auto& kv : src->named_parameters(true)) hf[kv.key()] = kv.value().detach();
    // graft names -> transformers names
    std::map<std::string, std::string> rename = {{"embed.weight", "model.embed_tokens.weight"},
                                                 {"norm.weight", "model.norm.weight"},
                                                 {"head.weight", "lm_head.weight"}};
    io::TensorMap out;
    for (auto& [name, t] : hf) {
      std::string n = name;
      if (rename.count(n))
        n = rename[n];
      else {
        n = "model." + n;
        for (auto [a, b] : std::vector<std::pair<std::string, std::string>>{
                 {"attn_norm", "input_layernorm"},
                 {"ffn_norm", "post_attention_layernorm"},
                 {"attn.q", "self_attn.q_proj"},
                 {"attn.k", "self_attn.k_proj"},
                 {"attn.v", "self_attn.v_proj"},
                 {"attn.o", "self_attn.o_proj"},
                 {"ffn.gate", "mlp.gate_proj"},
                 {"ffn.up", "mlp.up_proj"},
                 {"ffn.down", "mlp.down_proj"}})
          if (auto p = n.find(a); p != std::string::npos) n.replace(p, a.size(), b);
      }
      out[n] = t.to(torch::kBFloat16).to(torch::kFloat);  // exact in both
    }
    for (auto& kv : src->named_parameters(true)) {
      torch::NoGradGuard ng;
      kv.value().copy_(kv.value().to(torch::kBFloat16).to(torch::kFloat));
    }
    out["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch::ones({2});  // ignored buffer
    io::write_safetensors_model(dir.path(), out, 4000);                      // sharded
    write_json(dir / "config.json", {{"model_type", "llama"},
                                     {"architectures", {"LlamaForCausalLM"}},
                                     {"vocab_size", c.vocab_size},
                                     {"hidden_size", c.hidden_size},
                                     {"num_hidden_layers", c.num_layers},
                                     {"num_attention_heads", c.num_heads},
                                     {"num_key_value_heads", c.num_kv_heads},
                                     {"intermediate_size", c.intermediate_size},
                                     {"rms_norm_eps", c.norm_eps},
                                     {"rope_theta", c.rope_theta},
                                     {"tie_word_embeddings", false},
                                     {"max_position_embeddings", 64}});
    auto loaded = load_model(dir.path().string());
    CHECK(loaded.format == "hf");
    CHECK(loaded.model->config().num_kv_heads == 2);
    check_same_outputs(*src, *loaded.model);
    // A missing tensor is an error naming the folder and the parameter.
    io::TensorMap partial = out;
    partial.erase("model.layers.1.mlp.up_proj.weight");
    std::filesystem::remove(dir / "model.safetensors.index.json");
    for (auto& e : std::filesystem::directory_iterator(dir.path()))
      if (e.path().extension() == ".safetensors") std::filesystem::remove(e.path());
    io::write_safetensors(dir / "model.safetensors", partial);
    CHECK_THROWS_WITH_AS(load_model(dir.path().string()),
                         doctest::Contains("layers.1.ffn.up.weight"), FileError);
    partial["model.layers.1.mlp.up_proj.weight"] = torch::zeros({3, 3});
    io::write_safetensors(dir / "model.safetensors", partial);
    CHECK_THROWS_WITH_AS(load_model(dir.path().string()),
                         doctest::Contains("has shape [3, 3] in the file"), FileError);
  }
  SUBCASE("gpt2 (Conv1D weights, fused c_attn, transformer. prefix)") {
    auto src = build(tiny_gpt2(), 9);
    const auto& c = src->config();
    auto p = src->named_parameters(true);
    io::TensorMap out;
    out["transformer.wte.weight"] = p["embed.weight"].detach();
    out["transformer.wpe.weight"] = p["pos_embed.weight"].detach();
    out["transformer.ln_f.weight"] = p["norm.weight"].detach();
    out["transformer.ln_f.bias"] = p["norm.bias"].detach();
    for (int l = 0; l < c.num_layers; ++l) {
      const auto L = "layers." + std::to_string(l) + ".",
                 H = "transformer.h." + std::to_string(l) + ".";
      for (auto [a, b] : std::vector<std::pair<std::string, std::string>>{{"attn_norm", "ln_1"},
                                                                          {"ffn_norm", "ln_2"}}) {
        out[H + b + ".weight"] = p[L + a + ".weight"].detach();
        out[H + b + ".bias"] = p[L + a + ".bias"].detach();
      }
      out[H + "attn.c_attn.weight"] =
          torch::cat({p[L + "attn.q.weight"], p[L + "attn.k.weight"], p[L + "attn.v.weight"]})
              .t()
              .contiguous()
              .detach();
      out[H + "attn.c_attn.bias"] =
          torch::cat({p[L + "attn.q.bias"], p[L + "attn.k.bias"], p[L + "attn.v.bias"]}).detach();
      out[H + "attn.c_proj.weight"] = p[L + "attn.o.weight"].t().contiguous().detach();
      out[H + "attn.c_proj.bias"] = p[L + "attn.o.bias"].detach();
      out[H + "mlp.c_fc.weight"] = p[L + "ffn.up.weight"].t().contiguous().detach();
      out[H + "mlp.c_fc.bias"] = p[L + "ffn.up.bias"].detach();
      out[H + "mlp.c_proj.weight"] = p[L + "ffn.down.weight"].t().contiguous().detach();
      out[H + "mlp.c_proj.bias"] = p[L + "ffn.down.bias"].detach();
      out[H + "attn.bias"] = torch::ones({1, 1, 32, 32});  // the causal-mask buffer old files carry
    }
    io::write_safetensors(dir / "model.safetensors", out);
    write_json(dir / "config.json", {{"model_type", "gpt2"},
                                     {"vocab_size", c.vocab_size},
                                     {"n_embd", c.hidden_size},
                                     {"n_layer", c.num_layers},
                                     {"n_head", c.num_heads},
                                     {"n_positions", c.max_positions},
                                     {"n_inner", nullptr},
                                     {"activation_function", "gelu_new"}});
    auto loaded = load_model(dir.path().string());
    CHECK(loaded.model->config().intermediate_size == 48);
    check_same_outputs(*src, *loaded.model);
  }
  SUBCASE("bert (bert. prefix, LayerNorm gamma/beta, classifier)") {
    auto src = build(tiny_bert(false), 10);
    const auto& c = src->config();
    io::TensorMap out;
    for (const auto& kv : src->named_parameters(true)) {
      std::string n = kv.key();
      std::vector<std::pair<std::string, std::string>> rules = {
          {"embed.weight", "bert.embeddings.word_embeddings.weight"},
          {"pos_embed.weight", "bert.embeddings.position_embeddings.weight"},
          {"type_embed.weight", "bert.embeddings.token_type_embeddings.weight"},
          {"embed_norm.weight", "bert.embeddings.LayerNorm.gamma"},
          {"embed_norm.bias", "bert.embeddings.LayerNorm.beta"},
          {"pooler.weight", "bert.pooler.dense.weight"},
          {"pooler.bias", "bert.pooler.dense.bias"},
          {"head.weight", "classifier.weight"},
          {"head.bias", "classifier.bias"}};
      bool done = false;
      for (auto& [a, b] : rules)
        if (n == a) {
          n = b;
          done = true;
        }
      if (!done) {
        n = "bert.encoder.layer." + n.substr(7);
        for (auto [a, b] : std::vector<std::pair<std::string, std::string>>{
                 {"attn.q", "attention.self.query"},
                 {"attn.k", "attention.self.key"},
                 {"attn.v", "attention.self.value"},
                 {"attn.o", "attention.output.dense"},
                 {"attn_norm", "attention.output.LayerNorm"},
                 {"ffn.up", "intermediate.dense"},
                 {"ffn.down", "output.dense"},
                 {"ffn_norm", "output.LayerNorm"}})
          if (auto p = n.find(a); p != std::string::npos) n.replace(p, a.size(), b);
      }
      out[n] = kv.value().detach();
    }
    io::write_safetensors(dir / "model.safetensors", out);
    write_json(dir / "config.json", {{"model_type", "bert"},
                                     {"architectures", {"BertForSequenceClassification"}},
                                     {"vocab_size", c.vocab_size},
                                     {"hidden_size", c.hidden_size},
                                     {"num_hidden_layers", c.num_layers},
                                     {"num_attention_heads", c.num_heads},
                                     {"intermediate_size", c.intermediate_size},
                                     {"max_position_embeddings", c.max_positions},
                                     {"type_vocab_size", 2},
                                     {"layer_norm_eps", 1e-12},
                                     {"pad_token_id", 1},
                                     {"id2label", {{"0", "a"}, {"1", "b"}, {"2", "c"}}}});
    auto loaded = load_model(dir.path().string());
    CHECK(loaded.model->config().num_labels == 3);
    check_same_outputs(*src, *loaded.model);
  }
}

TEST_CASE("a llama GGUF file loads with identical outputs, and bad configs are clear errors") {
  TempDir dir;
  auto src = build(tiny_llama(RopeStyle::interleaved, false, true), 11);
  const auto& c = src->config();
  io::TensorMap t;
  for (const auto& kv : src->named_parameters(true)) {
    std::string n = kv.key();
    for (auto [a, b] : std::vector<std::pair<std::string, std::string>>{{"layers.", "blk."},
                                                                        {"attn.q", "attn_q"},
                                                                        {"attn.k", "attn_k"},
                                                                        {"attn.v", "attn_v"},
                                                                        {"attn.o", "attn_output"},
                                                                        {"ffn.gate", "ffn_gate"},
                                                                        {"ffn.up", "ffn_up"},
                                                                        {"ffn.down", "ffn_down"}})
      if (auto p = n.find(a); p != std::string::npos) n.replace(p, a.size(), b);
    if (n == "embed.weight") n = "token_embd.weight";
    if (n == "norm.weight") n = "output_norm.weight";
    t[n] = kv.value().detach();
  }
  std::vector<std::string> tokens;
  for (int i = 0; i < c.vocab_size; ++i) tokens.push_back("t" + std::to_string(i));
  std::vector<std::pair<std::string, io::GgufValue>> meta = {
      {"general.architecture", io::gguf_string("llama")},
      {"llama.embedding_length", io::gguf_int(c.hidden_size)},
      {"llama.block_count", io::gguf_int(c.num_layers)},
      {"llama.attention.head_count", io::gguf_int(c.num_heads)},
      {"llama.attention.head_count_kv", io::gguf_int(c.num_kv_heads)},
      {"llama.feed_forward_length", io::gguf_int(c.intermediate_size)},
      {"llama.attention.layer_norm_rms_epsilon", io::gguf_float(c.norm_eps)},
      {"llama.context_length", io::gguf_int(64)},
      {"tokenizer.ggml.model", io::gguf_string("llama")},
      {"tokenizer.ggml.tokens", io::gguf_strings(tokens)},
  };
  io::write_gguf(dir / "m.gguf", meta, t);
  auto loaded = load_model((dir / "m.gguf").string());
  CHECK(loaded.format == "gguf");
  // The file holds llama.cpp's interleaved q/k rows; graft runs them in transformers' order.
  CHECK(loaded.model->config().rope_style == RopeStyle::half_split);
  CHECK(torch::equal(loaded.model->named_parameters()["layers.0.attn.q.weight"],
                     permute_rope_rows(t.at("blk.0.attn_q.weight"), c.num_heads,
                                       RopeStyle::interleaved, RopeStyle::half_split)));
  CHECK(loaded.model->config().tie_embeddings);
  check_same_outputs(*src, *loaded.model);
  CHECK_THROWS_WITH_AS(load_model((dir / "m.gguf").string(), {"bert"}),
                       doctest::Contains("is a llama model"), FileError);

  meta[0].second = io::gguf_string("mamba");
  io::write_gguf(dir / "bad.gguf", meta, t);
  CHECK_THROWS_WITH_AS(load_model((dir / "bad.gguf").string()),
                       doctest::Contains("\"mamba\" is not supported"), FileError);
  // No heads (and no rope dimension to take the head size from): refused, not divided by.
  meta[0].second = io::gguf_string("llama");
  meta[3].second = io::gguf_int(0);
  io::write_gguf(dir / "heads.gguf", meta, t);
  CHECK_THROWS_WITH_AS(load_model((dir / "heads.gguf").string()),
                       doctest::Contains("llama.attention.head_count: expected a positive size, "
                                         "got 0"),
                       FileError);
}

TEST_CASE("configurations the forward cannot use are refused naming the key, before any tensor") {
  using models::config_from_hf;
  const std::map<std::string, nlohmann::json> good = {
      {"llama",
       {{"model_type", "llama"},
        {"vocab_size", 40},
        {"hidden_size", 16},
        {"num_hidden_layers", 2},
        {"num_attention_heads", 4},
        {"num_key_value_heads", 2},
        {"intermediate_size", 24}}},
      {"gpt2",
       {{"model_type", "gpt2"}, {"vocab_size", 40}, {"n_embd", 16}, {"n_layer", 2}, {"n_head", 4}}},
      {"bert",
       {{"model_type", "bert"},
        {"vocab_size", 40},
        {"hidden_size", 16},
        {"num_hidden_layers", 2},
        {"num_attention_heads", 4},
        {"intermediate_size", 24}}}};
  for (const auto& [family, j] : good) CHECK(config_from_hf(j, "config.json").family == family);
  struct Bad {
    std::string family, key;
    nlohmann::json value;
    std::string message;
  };
  const std::vector<Bad> bad = {
      {"gpt2", "n_head", 0, "n_head: expected a positive size, got 0"},
      {"bert", "num_attention_heads", 0, "num_attention_heads: expected a positive size, got 0"},
      {"llama", "num_attention_heads", 0, "num_attention_heads: expected a positive size, got 0"},
      {"llama", "num_key_value_heads", 3, "3 key/value heads do not divide the 4 attention heads"},
      {"llama", "vocab_size", -5, "vocab_size: expected a positive size, got -5"},
      {"llama", "head_dim", 3, "the head size 3 is odd"},
      {"llama", "hidden_size", 2, "the head size is 0: 4 attention heads in a width of 2"},
      {"llama", "rms_norm_eps", 0, "the norm epsilon must be a positive number"},
      {"llama", "rope_theta", -1, "the rotary base (rope_theta) must be a positive number"},
      {"bert", "num_attention_heads", 5, "5 attention heads do not divide the hidden size 16"},
      {"gpt2", "n_positions", 0, "n_positions: expected a positive size, got 0"},
      {"bert", "intermediate_size", 4294967296,
       "intermediate_size: expected a positive size, got 4294967296"}};
  for (const auto& b : bad) {
    CAPTURE(b.family);
    CAPTURE(b.key);
    auto j = good.at(b.family);
    j[b.key] = b.value;
    CHECK_THROWS_WITH_AS(config_from_hf(j, "config.json"),
                         doctest::Contains(("config.json: " + b.message).c_str()), FileError);
  }
}

TEST_CASE("a model name that is not found says where graft looked") {
  CHECK_THROWS_WITH_AS(resolve_model("no-such-model-xyz"), doctest::Contains("GRAFT_MODELS"),
                       Error);
}

TEST_CASE("a classifier reads each row's last real token, whichever side is padded") {
  auto llama = graft::test::tiny_model("llama");
  auto bert = graft::test::tiny_model("bert");
  ForwardOutput out;
  out.hidden = torch::arange(2 * 3 * 2, torch::kFloat).reshape({2, 3, 2});  // [batch, seq, d]
  // Row 0 right-padded (tokens at 0, 1), row 1 left-padded (tokens at 1, 2).
  const auto mask = torch::tensor({1, 1, 0, 0, 1, 1}, torch::kLong).reshape({2, 3});
  auto pooled = pooled_for_classification(*llama, out, mask);
  CHECK(torch::equal(pooled[0], out.hidden[0][1]));
  CHECK(torch::equal(pooled[1], out.hidden[1][2]));
  // An encoder reads its pooler output where it has one, else the first position.
  CHECK(torch::equal(pooled_for_classification(*bert, out, mask), out.hidden.select(1, 0)));
  out.pooled = torch::ones({2, 2});
  CHECK(torch::equal(pooled_for_classification(*bert, out, mask), out.pooled));
}
