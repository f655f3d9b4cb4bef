// The shared method test matrix: every method runs the same checks on every family.
//   - trainable-parameter count by the method's formula
//   - a no-op at initialisation (where the method defines it so)
//   - gradients reach only the method's parameters: the frozen base is bit-identical after
//     optimizer steps, and the loss goes down
//   - save/load round trip onto a fresh base model
//   - merge equals unmerged, and unmerge restores the base (mergeable methods)
//   - bad settings are one clear error
#include <graft/adapter.h>
#include <graft/adapter_set.h>
#include <graft/plugin.h>
#include <torch/torch.h>

#include <cmath>
#include <functional>
#include <set>

#include "method_params.h"
#include "numeric.h"
#include "support.h"
#include "tiny_models.h"

using namespace graft;
using graft::test::forward_terms;
using graft::test::load_test_plugins;
using graft::test::params;
using graft::test::reorder_tolerance;
using graft::test::TempDir;
using graft::test::tiny_model;

namespace {

using Count = std::function<std::int64_t(const ModelConfig&)>;

// One row of the matrix: a method (or a hybrid: several, attached in order) with its settings.
struct Case {
  std::string label;
  std::vector<std::pair<std::string, Params>> methods;
  Count trainable;
  bool noop_at_init;
  bool mergeable;
  bool exact_detach = true;     ///< detaching gives back the base exactly (not so after NF4)
  bool keeps_training = false;  ///< trains base parameters in place and keeps them on detach
};

std::int64_t kv_width(const ModelConfig& c) { return c.num_kv_heads * c.head_dim; }

// Sums `per_site(site)` over the tiny model's sites that `keep(site)` accepts.
template <typename Keep, typename PerSite>
std::int64_t over_sites(const ModelConfig& c, Keep keep, PerSite per_site) {
  std::int64_t n = 0;
  const auto model = tiny_model(c.family);  // alive while its sites are read
  for (const auto& s : model->sites())
    if (keep(s)) n += per_site(s);
  return n;
}
bool is_linear_not_head(const Site& s) {
  return Model::is_linear_point(s.point) && s.point != "head";
}
bool has_bias(const ModelConfig& c) { return c.family != "llama"; }
// The largest divisor of n not above its square root.
std::int64_t root_divisor(std::int64_t n) {
  auto f = static_cast<std::int64_t>(std::sqrt(static_cast<double>(n)));
  while (n % f) --f;
  return f;
}

std::vector<Case> cases() {
  return {
      {"lora defaults",
       {{"lora", params({{"r", "4"}})}},
       [](const ModelConfig& c) {
         const auto d = c.hidden_size;
         return c.num_layers * (4 * (d + d) + 4 * (d + kv_width(c)));
       },
       true,
       true},
      {"lora all-linear, rslora, gaussian, rank pattern",
       {{"lora", params({{"r", "2"},
                         {"alpha", "4"},
                         {"rslora", "true"},
                         {"init", "gaussian"},
                         {"targets", "[all-linear]"},
                         {"rank_pattern", ""}})}},
       nullptr,
       true,
       true},
      {"lora dora on attn.o and ffn.down, layer 1",
       {{"lora",
         params(
             {{"r", "3"}, {"dora", "true"}, {"targets", "[attn.o, ffn.down]"}, {"layers", "1"}})}},
       [](const ModelConfig& c) {
         const auto d = c.hidden_size, q = c.num_heads * c.head_dim, f = c.intermediate_size;
         return 3 * (q + d) + d + 3 * (f + d) + d;
       },
       true,
       true},
      {"full",
       {{"full", params({})}},
       [](const ModelConfig& c) {
         auto m = models::make_model(c);
         std::int64_t n = 0;
         for (const auto& p : m->parameters()) n += p.numel();
         return n;
       },
       true,
       false,
       true,
       true},
      // bitfit: one bias per projection output (llama has none: add_missing adds them).
      {"bitfit",
       {{"bitfit", params({{"add_missing", "true"}})}},
       [](const ModelConfig& c) {
         return over_sites(c, is_linear_not_head, [](const Site& s) { return s.out_features; });
       },
       true,
       true},
      // ia3: one vector per scaled output (k, v) and per scaled input (down).
      {"ia3",
       {{"ia3", params({})}},
       [](const ModelConfig& c) { return c.num_layers * (2 * kv_width(c) + c.intermediate_size); },
       true,
       true},
      // bottleneck adapters: down d*k + k, up k*d + d; k = d / reduction_factor.
      {"pfeiffer, mam init, reduction 4",
       {{"pfeiffer", params({{"reduction_factor", "4"}, {"init", "mam"}})}},
       [](const ModelConfig& c) {
         const auto d = c.hidden_size, k = d / 4;
         return c.num_layers * (2 * d * k + k + d);
       },
       true,
       false},
      {"houlsby, bert init, layer norms and gate",
       {{"houlsby", params({{"reduction_factor", "2"},
                            {"ln_before", "true"},
                            {"ln_after", "true"},
                            {"gating", "true"}})}},
       [](const ModelConfig& c) {
         const auto d = c.hidden_size, k = d / 2;
         return 2 * c.num_layers * (2 * d * k + k + d + 2 * d + 2 * d + d + 1);
       },
       false,
       false},
      {"parallel (MAM defaults)",
       {{"parallel", params({})}},
       [](const ModelConfig& c) {
         const auto d = c.hidden_size, k = d / 2;
         return c.num_layers * (2 * d * k + k + d);
       },
       true,
       false},
      // compacter: shared rules n^3; per adapter PHM down n(d/n + k/n) + k, up n(k/n + d/n) + d.
      {"compacter, reduction 4",
       {{"compacter", params({{"reduction_factor", "4"}})}},
       [](const ModelConfig& c) {
         const std::int64_t d = c.hidden_size, k = d / 4, n = 4;
         return n * n * n + 2 * c.num_layers * (2 * (d + k) + k + d);
       },
       true,
       false},
      {"compacter++, reduction 2, n 2",
       {{"compacter++", params({{"reduction_factor", "2"}, {"n", "2"}})}},
       [](const ModelConfig& c) {
         const std::int64_t d = c.hidden_size, k = d / 2, n = 2;
         return n * n * n + c.num_layers * (2 * (d + k) + k + d);
       },
       true,
       false},
      // AdapterHub's options: a learned scalar scaling, a norm after, the residual added before
      // it, the adapter closing the residual step itself (no post-norm, no residual after it).
      {"bottleneck, AdapterHub options: post_add residual, learned scaling, closes the step",
       {{"bottleneck", params({{"reduction_factor", "4"},
                               {"init", "mam"},
                               {"residual_before_ln", "post_add"},
                               {"adapter_residual_before_ln", "true"},
                               {"original_ln_after", "false"},
                               {"ln_after", "true"},
                               {"scaling", "learned"}})}},
       [](const ModelConfig& c) {
         const auto d = c.hidden_size, k = d / 4;
         return c.num_layers * (2 * d * k + k + d + 1 + 2 * d);
       },
       false,
       false},
      {"compacter, a factorised rule per layer, W of rank 2, channel scaling",
       {{"compacter", params({{"reduction_factor", "2"},
                              {"n", "2"},
                              {"shared_phm_rule", "false"},
                              {"factorized_phm_rule", "true"},
                              {"phm_rank", "2"},
                              {"scaling", "channel"}})}},
       [](const ModelConfig& c) {
         const std::int64_t d = c.hidden_size, k = d / 2, n = 2;
         // per PHM layer: rules 2 n^2, W_left in * rank, W_right rank * out, bias out.
         const auto phm = [&](std::int64_t in, std::int64_t out) {
           return 2 * n * n + 2 * in + 2 * out + out;
         };
         return 2 * c.num_layers * (phm(d, k) + phm(k, d) + d);
       },
       true,
       false},
      {"prompt_tuning, 3 vocab tokens",
       {{"prompt_tuning", params({{"num_virtual_tokens", "3"}, {"init", "vocab"}})}},
       [](const ModelConfig& c) { return 3 * c.hidden_size; },
       false,
       false},
      // prefix_tuning: Embedding(P, d) -> Linear(d, b) -> tanh -> Linear(b, L * 2 * kv).
      {"prefix_tuning, 4 tokens, bottleneck 8",
       {{"prefix_tuning", params({{"num_virtual_tokens", "4"}, {"bottleneck", "8"}})}},
       [](const ModelConfig& c) {
         const std::int64_t d = c.hidden_size, b = 8, w = c.num_layers * 2 * kv_width(c);
         return 4 * d + (d * b + b) + (b * w + w);
       },
       false,
       false},
      // AdapterHub's prefix: one per query head, positions not shifted, a gate per layer.
      {"prefix_tuning, AdapterHub style, gated",
       {{"prefix_tuning", params({{"num_virtual_tokens", "4"},
                                  {"bottleneck", "8"},
                                  {"style", "adapterhub"},
                                  {"gating", "true"}})}},
       [](const ModelConfig& c) {
         const std::int64_t d = c.hidden_size, b = 8,
                            w = c.num_layers * 2 * c.num_heads * c.head_dim;
         return 4 * d + (d * b + b) + (b * w + w) + c.num_layers * (d + 1);
       },
       false,
       false},
      {"prefix_tuning flat",
       {{"prefix_tuning", params({{"num_virtual_tokens", "2"}, {"flat", "true"}})}},
       [](const ModelConfig& c) { return 2 * c.num_layers * 2 * kv_width(c); },
       false,
       false},
      // krona: A a1 x a2 and B (out/a1) x (in/a2), factors nearest the square roots.
      {"krona on all-linear",
       {{"krona", params({{"targets", "[all-linear]"}})}},
       [](const ModelConfig& c) {
         return over_sites(c, is_linear_not_head, [&](const Site& s) {
           const auto a1 = root_divisor(s.out_features), a2 = root_divisor(s.in_features);
           return a1 * a2 + (s.out_features / a1) * (s.in_features / a2);
         });
       },
       true,
       true},
      // krona as peft's LoKr: each factor a rank-r product where r is below half its larger
      // side (both factors with decompose_both), else full.
      {"krona as LoKr, r 1, decompose_both",
       {{"krona", params({{"r", "1"}, {"decompose_both", "true"}, {"targets", "[all-linear]"}})}},
       [](const ModelConfig& c) {
         auto factor = [](std::int64_t rows, std::int64_t cols) {
           return 2 * 1 < std::max(rows, cols) ? rows + cols : rows * cols;
         };
         return over_sites(c, is_linear_not_head, [&](const Site& s) {
           const auto a1 = root_divisor(s.out_features), a2 = root_divisor(s.in_features);
           return factor(a1, a2) + factor(s.out_features / a1, s.in_features / a2);
         });
       },
       true,
       true},
      // loha: W1a, W2a [out, r] and W1b, W2b [r, in] per site.
      {"loha r 2 on attn.q, attn.v and ffn.down",
       {{"loha", params({{"r", "2"}, {"targets", "[attn.q, attn.v, ffn.down]"}})}},
       [](const ModelConfig& c) {
         return over_sites(
             c,
             [](const Site& s) {
               return s.point == "attn.q" || s.point == "attn.v" || s.point == "ffn.down";
             },
             [](const Site& s) { return 2 * 2 * (s.out_features + s.in_features); });
       },
       true,
       true},
      // intrinsic_said: theta_d plus one lambda per selected matrix.
      {"intrinsic_said, dim 64",
       {{"intrinsic_said", params({{"dim", "64"}, {"seed", "3"}})}},
       [](const ModelConfig& c) {
         return 64 + over_sites(c, is_linear_not_head, [](const Site&) { return 1; });
       },
       true,
       true},
      // layer_select: LayerNorm tuning (norm gains, and biases where the family has them).
      {"layer_select norms of the top layer",
       {{"layer_select", params({{"targets", "[norm.attn, norm.ffn]"}, {"top", "1"}})}},
       [](const ModelConfig& c) { return 2 * c.hidden_size * (has_bias(c) ? 2 : 1); },
       true,
       true},
      {"layer_select named parameters (peft's modules_to_save)",
       {{"layer_select",
         params({{"parameters", "[layers.1.attn.o.weight, layers.1.ffn_norm.weight]"}})}},
       [](const ModelConfig& c) { return c.hidden_size * c.hidden_size + c.hidden_size; },
       true,
       true},
      // sparse: round(density * numel) entries per selected matrix.
      {"sparse magnitude",
       {{"sparse", params({{"density", "0.1"}, {"targets", "[attn.q, ffn.up]"}})}},
       [](const ModelConfig& c) {
         return over_sites(
             c, [](const Site& s) { return s.point == "attn.q" || s.point == "ffn.up"; },
             [](const Site& s) {
               return std::llround(0.1 * double(s.in_features * s.out_features));
             });
       },
       true,
       true},
      {"sparse random",
       {{"sparse", params({{"density", "0.05"}, {"selection", "random"}})}},
       [](const ModelConfig& c) {
         return over_sites(c, is_linear_not_head, [](const Site& s) {
           return std::max<std::int64_t>(
               1, std::llround(0.05 * double(s.in_features * s.out_features)));
         });
       },
       true,
       true},
      {"sparse gradient",
       {{"sparse",
         params({{"density", "0.05"}, {"selection", "gradient"}, {"calibration_batches", "2"}})}},
       [](const ModelConfig& c) {
         return over_sites(c, is_linear_not_head, [](const Site& s) {
           return std::max<std::int64_t>(
               1, std::llround(0.05 * double(s.in_features * s.out_features)));
         });
       },
       true,
       true},
      // QLoRA: quantize (no parameters) + lora on every linear site. Not a no-op: NF4 rounds.
      {"QLoRA: quantize + lora on all-linear",
       {{"quantize", params({})}, {"lora", params({{"r", "2"}, {"targets", "[all-linear]"}})}},
       [](const ModelConfig& c) {
         return over_sites(c, is_linear_not_head,
                           [](const Site& s) { return 2 * (s.in_features + s.out_features); });
       },
       false,
       true,
       false},
      // UniPELT's parts with their gates: not mergeable (the gate reads the input); a gate
      // starts at sigmoid(.) = 1/2-ish, so the gated delta is still zero at first.
      {"UniPELT: gated prefix + gated pfeiffer + gated lora",
       {{"prefix_tuning",
         params({{"num_virtual_tokens", "2"}, {"flat", "true"}, {"gating", "true"}})},
        {"pfeiffer", params({{"reduction_factor", "4"}, {"init", "mam"}, {"gating", "true"}})},
        {"lora", params({{"r", "2"}, {"alpha", "2"}, {"gating", "true"}})}},
       [](const ModelConfig& c) {
         const std::int64_t d = c.hidden_size, k = d / 4, kv = kv_width(c);
         return 2 * c.num_layers * 2 * kv + c.num_layers * (d + 1) +        // prefix, gates
                c.num_layers * (2 * d * k + k + d + d + 1) +                // pfeiffer + gate
                c.num_layers * (2 * (d + d) + 2 * (d + kv) + 2 * (d + 1));  // lora + gates
       },
       false,
       false},
      // A hybrid of a weight delta, a scale and an adapter on the same model.
      {"lora + ia3 + pfeiffer",
       {{"lora", params({{"r", "2"}})},
        {"ia3", params({})},
        {"pfeiffer", params({{"reduction_factor", "4"}, {"init", "mam"}})}},
       [](const ModelConfig& c) {
         const auto d = c.hidden_size, k = d / 4;
         return c.num_layers * (2 * (d + d) + 2 * (d + kv_width(c)) + 2 * kv_width(c) +
                                c.intermediate_size + 2 * d * k + k + d);
       },
       true,
       false},
  };
}

// A rank pattern given as a nested map: r 2 everywhere but 5 on ffn sites of layer 0.
Case with_rank_pattern(Case c) {
  auto pattern = Params::map("methods[0].rank_pattern", Source{"recipe.yaml", 5, 5});
  pattern.set("layers.0.ffn.*", Params::scalar("5", "methods[0].rank_pattern.layers.0.ffn.*"));
  c.methods[0].second.set("rank_pattern", pattern);
  c.trainable = [](const ModelConfig& c) {
    std::int64_t n = 0;
    const auto model = tiny_model(c.family);  // alive while its sites are read
    for (const auto& s : model->sites()) {
      if (!Model::is_linear_point(s.point) || s.point == "head") continue;
      const std::int64_t r = s.layer == 0 && s.point.rfind("ffn.", 0) == 0 ? 5 : 2;
      n += r * (s.in_features + s.out_features);
    }
    return n;
  };
  return c;
}

// The matrix's batch: 2 rows of 6 tokens; soft prompts and prefixes add at most this many keys.
constexpr std::int64_t kSeq = 6, kMaxVirtual = 8;

ForwardInput batch_for(const Model& m) {
  auto ids = torch::tensor({3, 7, 1, 9, 4, 2, 5, 6, 8, 11, 0, 0}, torch::kLong).view({2, 6});
  auto mask = torch::tensor({1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0}, torch::kLong).view({2, 6});
  ForwardInput in{ids, mask, {}, {}};
  if (m.config().family == "bert") in.token_type_ids = torch::zeros_like(ids);
  return in;
}

at::Tensor outputs(Model& m) {
  torch::NoGradGuard ng;
  auto out = m.forward(batch_for(m), nullptr);
  return out.logits.defined() ? out.logits : out.hidden;
}

// A loss every family can compute: next-token cross-entropy for LMs, labels for classifiers.
at::Tensor loss(Model& m) {
  auto in = batch_for(m);
  auto out = m.forward(in, nullptr);
  if (m.config().family == "bert")
    return torch::cross_entropy_loss(out.logits, torch::tensor({0, 2}, torch::kLong));
  auto logits = out.logits.slice(1, 0, -1).reshape({-1, m.config().vocab_size});
  auto target = in.input_ids.slice(1, 1).reshape({-1});
  return torch::cross_entropy_loss(logits, target);
}

std::map<std::string, at::Tensor> snapshot(Model& m) {
  std::map<std::string, at::Tensor> s;
  for (const auto& p : m.named_parameters(true)) s[p.key()] = p.value().detach().clone();
  return s;
}

// Every row of the matrix, the second with a rank pattern given as a nested map.
std::vector<Case> all_cases() {
  auto all = cases();
  all[1] = with_rank_pattern(all[1]);
  return all;
}

// The case's methods made and attached to `model` in order, calibrated where they need it.
std::vector<std::unique_ptr<Method>> attach_case(const Case& c, Model& model) {
  std::vector<std::unique_ptr<Method>> owned;
  for (const auto& [name, settings] : c.methods) {
    owned.push_back(make_method(name, settings));
    owned.back()->attach(model);
  }
  for (auto& m : owned)
    if (m->needs_calibration()) m->calibrate(model, [&] { return loss(model); });
  return owned;
}

// Five AdamW steps on `train` with the methods in training mode: the loss before and after.
std::pair<double, double> train_steps(Model& model, const std::vector<Method*>& methods,
                                      const std::vector<at::Tensor>& train) {
  torch::optim::AdamW opt(train, torch::optim::AdamWOptions(1e-2).weight_decay(0.0));
  for (auto* m : methods) m->set_training(true);
  const double before = loss(model).item<double>();
  for (int step = 0; step < 5; ++step) {
    opt.zero_grad();
    loss(model).backward();
    opt.step();
  }
  const double after = loss(model).item<double>();
  for (auto* m : methods) m->set_training(false);
  return {before, after};
}

}  // namespace

TEST_CASE("method matrix") {
  load_test_plugins();
  const auto all = all_cases();
  for (const auto& c : all) {
    for (const std::string family : {"llama", "gpt2", "bert"}) {
      CAPTURE(c.label);
      CAPTURE(family);
      torch::manual_seed(5);
      auto model = tiny_model(family, 11);
      const auto base_out = outputs(*model);
      const auto base = snapshot(*model);
      const auto terms = forward_terms(model->config(), kSeq + kMaxVirtual);
      const auto owned = attach_case(c, *model);
      std::vector<Method*> methods;
      for (const auto& m : owned) methods.push_back(m.get());
      const auto attached = snapshot(*model);  // the base as the methods left it (NF4 releases)

      // 1. trainable parameters by formula
      std::int64_t n = 0;
      std::set<const void*> trained;
      std::vector<at::Tensor> train;
      for (auto* m : methods)
        for (const auto& [name, t] : m->trainable_parameters()) {
          n += t.numel();
          CHECK_MESSAGE(t.requires_grad(), name);
          trained.insert(t.unsafeGetTensorImpl());
          train.push_back(t);
        }
      CHECK(n == c.trainable(model->config()));
      const auto summary = trainable_summary(*model, methods);
      CHECK_MESSAGE(summary.rfind("trainable params: ", 0) == 0, summary);
      CHECK_MESSAGE(summary.find(" || all params: ") != std::string::npos, summary);

      // 2. a no-op at initialisation
      if (c.noop_at_init)
        GRAFT_CHECK_CLOSE(outputs(*model), base_out, reorder_tolerance(base_out, terms));

      // 3. gradients only into the methods' parameters; the loss goes down
      const auto [before, after] = train_steps(*model, methods, train);
      CHECK(after < before);
      for (const auto& p : model->named_parameters(true)) {
        if (trained.count(p.value().unsafeGetTensorImpl())) continue;
        CHECK_MESSAGE(torch::equal(p.value(), attached.at(p.key())), "base changed: " << p.key());
        CHECK_FALSE(p.value().grad().defined());
      }
      const auto trained_out = outputs(*model);
      // What the method changed must stand far above float32 rounding, or the checks below that
      // merging, reloading and detaching keep or remove it could not fail.
      const auto tolerance = reorder_tolerance(trained_out, terms);
      CHECK(graft::test::max_diff(trained_out, base_out) > 100 * tolerance);

      // 4. save and load onto a fresh copy of the base model
      TempDir dir;
      save_adapter(dir.path(), *model, methods);
      auto fresh = tiny_model(family, 11);
      auto loaded = load_adapter(dir.path(), *fresh);
      REQUIRE(loaded.size() == methods.size());
      for (std::size_t i = 0; i < methods.size(); ++i)
        CHECK(loaded[i]->name() == c.methods[i].first);
      // The same weights through the same code: bit for bit.
      CHECK(torch::equal(outputs(*fresh), trained_out));

      // 4b. named adapters: the saved adapter loaded twice on one base, switched, routed and
      // unloaded; off, the model is the base bit for bit.
      {
        auto base_model = tiny_model(family, 11);
        AdapterSet set(*base_model);
        set.load("one", dir.path());
        bool two = true;  // a second copy composes with the first, or one line says why not
        try {
          set.load("two", dir.path());
        } catch (const Error& e) {
          two = false;
          CHECK_MESSAGE(std::string(e.what()).find('\n') == std::string::npos, e.what());
          CHECK(set.names() == std::vector<std::string>{"one"});
          CHECK(torch::equal(outputs(*base_model), trained_out));
        }
        bool in_place = false;
        try {
          set.set_active({});
        } catch (const Error& e) {  // full fine-tuning, NF4, trained norms: always on
          in_place = true;
          CHECK_MESSAGE(std::string(e.what()).find("changed the base model's own tensors") !=
                            std::string::npos,
                        e.what());
          CHECK_THROWS_AS(set.unload("one"), Error);
          CHECK_THROWS_AS(set.route({"one", kBaseRoute}), Error);
        }
        if (!in_place) {
          CHECK(torch::equal(outputs(*base_model), base_out));
          set.set_active({"one"});
          CHECK(torch::equal(outputs(*base_model), trained_out));
          if (two) {
            set.set_active({"two", "one"});
            CHECK(outputs(*base_model).isfinite().all().item<bool>());
          } else {
            set.set_active({"one"});
          }
          try {
            set.route({"one", kBaseRoute});
            const auto routed = outputs(*base_model);
            // Row by row as alone, within the reordering of a product over fewer rows.
            GRAFT_CHECK_CLOSE(routed[0], trained_out[0], tolerance);
            GRAFT_CHECK_CLOSE(routed[1], base_out[1], reorder_tolerance(base_out, terms));
            set.end_route();
          } catch (const Error& e) {  // prefixes, prompts, weight transforms
            CHECK_MESSAGE(std::string(e.what()).rfind("route: adapter 'one' cannot serve", 0) == 0,
                          e.what());
            CHECK_FALSE(set.routed());
          }
          if (two) set.unload("two");
          CHECK(torch::equal(outputs(*base_model), trained_out));
          set.unload("one");
          CHECK(set.names().empty());
          CHECK(torch::equal(outputs(*base_model), base_out));
        }
      }

      // 5. merge equals unmerged; unmerge restores the base weights
      if (c.mergeable) {
        for (auto* m : methods) m->merge(*model);
        for (auto* m : methods) CHECK(m->merged());
        // A merged weight sums W and the delta before the product instead of after it.
        GRAFT_CHECK_CLOSE(outputs(*model), trained_out, tolerance);
        const auto merged = snapshot(*model);
        bool changed = false;
        for (const auto& p : model->named_parameters(true))
          changed |= !attached.count(p.key()) || !torch::equal(p.value(), attached.at(p.key()));
        CHECK(changed);
        for (auto it = methods.rbegin(); it != methods.rend(); ++it) (*it)->unmerge(*model);
        for (const auto& p : model->named_parameters(true)) {
          // A parameter trained in place already is the base: merging leaves it as it is.
          if (trained.count(p.value().unsafeGetTensorImpl())) {
            CHECK_MESSAGE(torch::equal(p.value(), merged.at(p.key())), p.key());
            continue;
          }
          // (W + D) - D rounds twice: within u*|W + D| + u*|W| of W, elementwise. A bias that
          // merging added (bitfit's add_missing) is D - D, zero within u*|D|.
          const auto before =
              attached.count(p.key()) ? attached.at(p.key()) : torch::zeros_like(p.value());
          const auto& during = merged.at(p.key());
          if (during.sizes() != p.value().sizes()) {  // a released NF4 base is released again
            CHECK_MESSAGE(torch::equal(p.value(), before), p.key());
            continue;
          }
          const auto bound = 2 * graft::test::kUnit32 * (during.abs() + before.abs()) + 1e-38;
          CHECK_MESSAGE(((p.value() - before).abs() <= bound).all().item<bool>(), p.key());
        }
        GRAFT_CHECK_CLOSE(outputs(*model), trained_out, tolerance);
      } else {
        bool refused = false;
        for (auto* m : methods) {
          try {
            m->merge(*model);
            m->unmerge(*model);  // a mergeable part of a hybrid
          } catch (const Error&) {
            refused = true;
          }
        }
        CHECK(refused);
      }
      for (auto it = methods.rbegin(); it != methods.rend(); ++it) (*it)->detach(*model);
      // Detached, the model is the base again (to float tolerance after a merge round trip; bit
      // for bit where the method put back base parameters it trained in place), unless the
      // method keeps what it trained (full fine-tuning).
      bool in_place = false;
      for (const auto& p : model->named_parameters(true))
        in_place |= trained.count(p.value().unsafeGetTensorImpl()) > 0;
      if (in_place && !c.keeps_training)
        for (const auto& p : model->named_parameters(true))
          CHECK_MESSAGE(torch::equal(p.value(), base.at(p.key())), "not restored: " << p.key());
      if (!c.keeps_training && c.exact_detach)
        GRAFT_CHECK_CLOSE(outputs(*model), base_out, reorder_tolerance(base_out, terms));
    }
  }
}

TEST_CASE("method settings errors are one clear line") {
  load_test_plugins();
  CHECK_THROWS_WITH_AS(
      make_method("lora", params({{"dropuot", "0.1"}})),
      "recipe.yaml:4:5: methods[0].dropuot: unknown key (did you mean \"dropout\"?)", ParamError);
  CHECK_THROWS_WITH_AS(make_method("lora", params({{"r", "eight"}})),
                       "recipe.yaml:4:5: methods[0].r: expected a positive integer, got \"eight\"",
                       ParamError);
  CHECK_THROWS_WITH_AS(make_method("lora", params({{"dropout", "1.5"}})),
                       doctest::Contains("expected a number in [0, 1)"), ParamError);
  CHECK_THROWS_WITH_AS(make_method("lora", params({{"init", "gausian"}})),
                       doctest::Contains("did you mean \"gaussian\"?"), ParamError);
  CHECK_THROWS_WITH_AS(make_method("lorra", params({})),
                       doctest::Contains("did you mean \"lora\"?"), Error);
  CHECK_THROWS_WITH_AS(make_method("full", params({{"r", "8"}})),
                       doctest::Contains("methods[0].r: unknown key"), ParamError);
  auto model = tiny_model("llama");
  auto typo = make_method("lora", params({{"targets", "[attn.qq]"}}));
  CHECK_THROWS_WITH_AS(typo->attach(*model), doctest::Contains("did you mean \"attn.q\"?"),
                       ParamError);
  auto none = make_method("lora", params({{"targets", "[layers.9.*]"}}));
  CHECK_THROWS_WITH_AS(none->attach(*model),
                       doctest::Contains("the points of this llama model are embed, attn.in"),
                       ParamError);
  auto not_linear = make_method("lora", params({{"targets", "[ffn.act]"}}));
  CHECK_THROWS_WITH_AS(not_linear->attach(*model), doctest::Contains("is not a linear projection"),
                       Error);
}

TEST_CASE("an adapter refuses a base model it was not trained on") {
  load_test_plugins();
  TempDir dir;
  auto model = tiny_model("llama");
  auto lora = make_method("lora", params({}));
  lora->attach(*model);
  save_adapter(dir.path(), *model, {lora.get()});

  auto other = models::make_model([] {
    auto c = graft::test::tiny_config("llama");
    c.hidden_size = 24;
    c.head_dim = 6;
    return c;
  }());
  CHECK_THROWS_WITH_AS(load_adapter(dir.path(), *other),
                       doctest::Contains("hidden_size 16, but this model has 24"), FileError);
  auto gpt2 = tiny_model("gpt2");
  CHECK_THROWS_WITH_AS(load_adapter(dir.path(), *gpt2), doctest::Contains("family \"llama\""),
                       FileError);
  CHECK_THROWS_WITH_AS(load_adapter(dir.path() / "nope", *model),
                       doctest::Contains("not an adapter folder"), FileError);
}

// peft's recipe for half-precision models: the base computes in bfloat16 while the methods keep
// float32 parameters (its autocast_adapter_dtype), so that small updates are not rounded away.
TEST_CASE("every method trains a bfloat16 model with float32 parameters") {
  load_test_plugins();
  const auto all = all_cases();
  for (const auto& c : all) {
    for (const std::string family : {"llama", "gpt2", "bert"}) {
      CAPTURE(c.label);
      CAPTURE(family);
      torch::manual_seed(5);
      auto model = tiny_model(family, 11);
      model->to(torch::kBFloat16);
      std::set<const void*> base;
      for (const auto& t : model->parameters()) base.insert(t.unsafeGetTensorImpl());
      const auto owned = attach_case(c, *model);
      std::vector<Method*> methods;
      for (const auto& m : owned) methods.push_back(m.get());
      const auto attached = snapshot(*model);
      std::vector<at::Tensor> train;
      std::set<const void*> trained;
      for (auto* m : methods)
        for (const auto& [name, t] : m->trainable_parameters()) {
          // Parameters of the base trained in place keep its dtype; a method's own are float32.
          const auto expected =
              base.count(t.unsafeGetTensorImpl()) ? torch::kBFloat16 : torch::kFloat;
          CHECK_MESSAGE(bool(t.scalar_type() == expected), name << " is " << t.scalar_type());
          trained.insert(t.unsafeGetTensorImpl());
          train.push_back(t);
        }
      CHECK(bool(outputs(*model).scalar_type() == torch::kBFloat16));
      const auto [before, after] = train_steps(*model, methods, train);
      CHECK(std::isfinite(after));
      CHECK(after < before);
      for (const auto& p : model->named_parameters(true))
        if (!trained.count(p.value().unsafeGetTensorImpl()))
          CHECK_MESSAGE(torch::equal(p.value(), attached.at(p.key())), "base changed: " << p.key());
      const auto trained_out = outputs(*model);
      CHECK(bool(trained_out.scalar_type() == torch::kBFloat16));

      TempDir dir;
      save_adapter(dir.path(), *model, methods);
      auto fresh = tiny_model(family, 11);
      fresh->to(torch::kBFloat16);
      auto loaded = load_adapter(dir.path(), *fresh);
      CHECK(torch::equal(outputs(*fresh), trained_out));
    }
  }
}
