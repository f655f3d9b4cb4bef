// Hooks at sites: every kind, their composition order, claims, and site selection.
#include <graft/generate.h>
#include <graft/method.h>
#include <torch/torch.h>

#include "numeric.h"
#include "support.h"
#include "tiny_models.h"

using namespace graft;
using graft::test::tiny_model;

namespace {

class Doubler : public WeightTransform {
 public:
  at::Tensor transform(const at::Tensor& w, const LinearImpl&) override { return w * 2; }
};
class AddOnes : public LinearDelta {
 public:
  at::Tensor delta(const at::Tensor& x, const LinearImpl& site) override {
    return torch::ones({x.size(0), site.out_features});
  }
};
class Scale : public LinearScale {
 public:
  Scale(Side side, at::Tensor s) : side_(side), s_(std::move(s)) {}
  Side side() const override { return side_; }
  at::Tensor scale() override { return s_; }

 private:
  Side side_;
  at::Tensor s_;
};
class Twice : public SublayerTransform {
 public:
  at::Tensor transform(const at::Tensor& out, const at::Tensor&) override { return out * 2; }
};
class AddInput : public SublayerTransform {
 public:
  at::Tensor transform(const at::Tensor& out, const at::Tensor& in) override { return out + in; }
};
class FixedPrefix : public KvExtension {
 public:
  FixedPrefix(std::int64_t kv_heads, std::int64_t p, std::int64_t dim)
      : k_(torch::randn({1, kv_heads, p, dim})), v_(torch::randn({1, kv_heads, p, dim})) {}
  std::pair<at::Tensor, at::Tensor> prefix(const at::Tensor& input) override {
    const auto batch = input.size(0);
    return {k_.expand({batch, -1, -1, -1}), v_.expand({batch, -1, -1, -1})};
  }
  std::int64_t length() const override { return k_.size(2); }

 private:
  at::Tensor k_, v_;
};
class FixedPrompt : public EmbeddingExtension {
 public:
  explicit FixedPrompt(at::Tensor p) : p_(std::move(p)) {}
  at::Tensor prompt(std::int64_t batch) override { return p_.unsqueeze(0).expand({batch, -1, -1}); }

 private:
  at::Tensor p_;
};

at::Tensor logits(Model& m, const at::Tensor& ids, const at::Tensor& mask = {}) {
  torch::NoGradGuard ng;
  return m.forward({ids, mask, {}, {}}, nullptr).logits;
}

}  // namespace

TEST_CASE(
    "a linear site composes weight transforms, input scales, deltas and output scales in order") {
  auto m = tiny_model("gpt2");
  auto* lin = m->linear("layers.0.attn.q");
  REQUIRE(lin);
  auto x = torch::randn({3, lin->in_features});
  auto s_in = torch::rand({lin->in_features}) + 0.5;
  auto s_out = torch::rand({lin->out_features}) + 0.5;
  m->attach("layers.0.attn.q", std::make_shared<Scale>(LinearScale::Side::output, s_out), "t");
  m->attach("layers.0.attn.q", std::make_shared<AddOnes>(), "t");
  m->attach("layers.0.attn.q", std::make_shared<Scale>(LinearScale::Side::input, s_in), "t");
  m->attach("layers.0.attn.q", std::make_shared<Doubler>(), "t");
  torch::NoGradGuard ng;
  auto expected = ((x * s_in).matmul(lin->weight.t() * 2) + lin->bias + 1) * s_out;
  // One dot product of in_features terms, then a few elementwise roundings.
  GRAFT_CHECK_CLOSE(lin->forward(x), expected,
                    graft::test::reorder_tolerance(expected, lin->in_features + 4));
  CHECK(torch::equal(lin->plain(x), torch::linear(x, lin->weight, lin->bias)));
}

TEST_CASE(
    "sublayer transforms at every activation point change the output, and detaching restores it") {
  for (const std::string family : {"llama", "gpt2", "bert"}) {
    CAPTURE(family);
    auto m = tiny_model(family);
    auto ids = torch::tensor({{2, 3, 4, 5}}, torch::kLong);
    auto base = m->forward({ids, {}, {}, {}}, nullptr).hidden;
    for (const std::string point : {"attn.in", "attn.out", "ffn.in", "ffn.act", "ffn.out"}) {
      CAPTURE(point);
      std::shared_ptr<Hook> hook = std::make_shared<Twice>();
      if (point == "ffn.out" || point == "attn.out")
        hook = std::make_shared<AddInput>();  // reads the input
      const std::string site = "layers.1." + point;
      m->attach(site, hook, "t");
      CHECK_FALSE(torch::allclose(m->forward({ids, {}, {}, {}}, nullptr).hidden, base));
      m->detach(site, hook);
      CHECK_FALSE(m->hooks(site).active);
      CHECK(torch::equal(m->forward({ids, {}, {}, {}}, nullptr).hidden, base));
    }
  }
}

TEST_CASE("a hook of the wrong kind for a site, and conflicting claims, are errors") {
  auto m = tiny_model("llama");
  CHECK_THROWS_WITH_AS(m->attach("layers.0.ffn.out", std::make_shared<AddOnes>(), "m"),
                       "m: a linear delta cannot attach at site 'layers.0.ffn.out' (point ffn.out)",
                       Error);
  CHECK_THROWS_WITH_AS(m->attach("layers.0.attn.q", std::make_shared<AddInput>(), "m"),
                       doctest::Contains("a sublayer transform cannot attach"), Error);
  CHECK_THROWS_WITH_AS(m->attach("layers.0.attn.v", std::make_shared<FixedPrefix>(2, 3, 4), "m"),
                       doctest::Contains("a key/value extension cannot attach"), Error);
  CHECK_THROWS_WITH_AS(m->attach("layers.7.attn.q", std::make_shared<AddOnes>(), "m"),
                       doctest::Contains("no site named 'layers.7.attn.q'"), Error);
  m->attach("layers.0.attn.q", std::make_shared<AddOnes>(), "a", Claim::exclusive);
  m->attach("layers.0.attn.q", std::make_shared<AddOnes>(), "a",
            Claim::exclusive);  // the owner may add more
  CHECK_THROWS_WITH_AS(m->attach("layers.0.attn.q", std::make_shared<AddOnes>(), "b"),
                       "b: site 'layers.0.attn.q' is claimed exclusively by a", Error);
  m->attach("layers.0.attn.k", std::make_shared<AddOnes>(), "a");
  CHECK_THROWS_WITH_AS(
      m->attach("layers.0.attn.k", std::make_shared<AddOnes>(), "b", Claim::exclusive),
      "b: needs site 'layers.0.attn.k' alone, but a is attached there", Error);
}

TEST_CASE("key/value prefixes are attended by every query, cached once, and work with padding") {
  auto m = tiny_model("llama", 3, 0.5);
  const auto& c = m->config();
  auto ids = torch::tensor({0, 0, 5, 9, 3, 7, 11, 13, 2, 4}, torch::kLong).view({2, 5});
  auto mask = torch::tensor({0, 0, 1, 1, 1, 1, 1, 1, 1, 1}, torch::kLong).view({2, 5});
  auto base = logits(*m, ids, mask);
  for (int l = 0; l < c.num_layers; ++l)
    m->attach("layers." + std::to_string(l) + ".attn.kv",
              std::make_shared<FixedPrefix>(c.num_kv_heads, 3, c.head_dim), "p");
  auto with_prefix = logits(*m, ids, mask);
  CHECK(with_prefix.sizes() == base.sizes());
  CHECK_FALSE(torch::allclose(with_prefix, base));
  GenerationOptions o;
  o.max_new_tokens = 6;
  auto cached = generate(*m, ids, mask, o);
  o.use_cache = false;
  CHECK(torch::equal(cached, generate(*m, ids, mask, o)));
  // The padded row continues as it does alone.
  o.use_cache = true;
  CHECK(torch::equal(cached[0], generate(*m, ids.slice(1, 2).narrow(0, 0, 1), {}, o)[0]));
}

TEST_CASE("prompt vectors equal to token embeddings act as those tokens") {
  for (const std::string family : {"llama", "gpt2", "bert"}) {
    CAPTURE(family);
    auto m = tiny_model(family, 4, 0.5);
    auto embed = m->named_parameters()["embed.weight"];
    auto prompt_ids = torch::tensor({6, 8}, torch::kLong);
    auto ids = torch::tensor({{3, 4, 5}}, torch::kLong);
    torch::NoGradGuard ng;
    auto full = m->forward({torch::cat({prompt_ids.unsqueeze(0), ids}, 1), {}, {}, {}}, nullptr);
    m->attach("embed", std::make_shared<FixedPrompt>(embed.index_select(0, prompt_ids)), "prompt");
    auto out = m->forward({ids, {}, {}, {}}, nullptr);
    const auto terms = graft::test::forward_terms(m->config(), 5);
    CHECK(out.hidden.size(1) == 3);  // the prompt's positions are dropped
    if (family == "bert") {
      // Bidirectional: all positions see the same tokens, so the real tokens' states agree.
      GRAFT_CHECK_CLOSE(out.hidden, full.hidden.slice(1, 2),
                        graft::test::reorder_tolerance(full.hidden, terms));
    } else {
      GRAFT_CHECK_CLOSE(out.logits, full.logits.slice(1, 2),
                        graft::test::reorder_tolerance(full.logits, terms));
      GenerationOptions o;
      o.max_new_tokens = 5;
      auto cached = generate(*m, ids, {}, o);
      o.use_cache = false;
      CHECK(torch::equal(cached, generate(*m, ids, {}, o)));
    }
  }
}

TEST_CASE("site selection by point, pattern, layers and leave_out") {
  auto m = tiny_model("llama");
  auto names = [&](const Selection& s) {
    std::vector<std::string> out;
    for (const auto& site : select_sites(*m, s, "test")) out.push_back(site.name);
    return out;
  };
  Selection s;
  s.targets = {"attn.q"};
  CHECK(names(s) == std::vector<std::string>{"layers.0.attn.q", "layers.1.attn.q"});
  s.layers = {1};
  CHECK(names(s) == std::vector<std::string>{"layers.1.attn.q"});
  s.layers = {};
  s.leave_out = {0};
  CHECK(names(s) == std::vector<std::string>{"layers.1.attn.q"});
  s = Selection{};
  s.targets = {"layers.*.ffn.?p"};
  CHECK(names(s) == std::vector<std::string>{"layers.0.ffn.up", "layers.1.ffn.up"});
  s.targets = {"all-linear"};
  CHECK(names(s).size() == 14);  // 7 projections x 2 layers, not the head
  s.targets = {"head", "embed"};
  CHECK(names(s) == std::vector<std::string>{"embed", "head"});
  s.targets = {"ffn.gate"};
  auto gpt2 = tiny_model("gpt2");
  CHECK_THROWS_WITH_AS(select_sites(*gpt2, s, "test"), doctest::Contains("match no site"), Error);
  CHECK(glob_match("layers.*.attn.?", "layers.12.attn.q"));
  CHECK_FALSE(glob_match("layers.*.attn.?", "layers.12.attn.qq"));

  auto p = Params::map("methods[1]", {"r.yaml", 2, 3});
  p.set("targets", Params::scalar("attn.q", "methods[1].targets", {"r.yaml", 3, 14}));
  p.set("layers", Params::scalar("0-1", "methods[1].layers", {"r.yaml", 4, 13}));
  p.set("leave_out", Params::scalar("1", "methods[1].leave_out", {"r.yaml", 5, 16}));
  auto sel = Selection::from_params(p, {});
  CHECK(sel.layers == std::vector<std::int64_t>{0, 1});
  CHECK(sel.leave_out == std::vector<std::int64_t>{1});
  p.set("layers", Params::scalar("3-1", "methods[1].layers", {"r.yaml", 4, 13}));
  CHECK_THROWS_WITH_AS(Selection::from_params(p, {}),
                       "r.yaml:4:13: methods[1].layers: the range 3-1 is empty", ParamError);
}

TEST_CASE("parameters report their source and did-you-mean") {
  auto p = Params::map("methods[0]", {"recipe.yaml", 11, 5});
  p.set("r", Params::scalar("eight", "methods[0].r", {"recipe.yaml", 12, 7}));
  p.set("alpah", Params::scalar("16", "methods[0].alpah", {"recipe.yaml", 13, 7}));
  CHECK_THROWS_WITH_AS(p.at("r").as_positive_int(),
                       "recipe.yaml:12:7: methods[0].r: expected a positive integer, got \"eight\"",
                       ParamError);
  CHECK_THROWS_WITH_AS(p.check_keys({"r", "alpha"}),
                       "recipe.yaml:13:7: methods[0].alpah: unknown key (did you mean \"alpha\"?)",
                       ParamError);
  CHECK(p.get_int("missing", 4) == 4);
  CHECK(Params::scalar("1e-3").as_double() == doctest::Approx(1e-3));
  CHECK_THROWS_AS(Params::scalar("12", "x", {}, /*quoted=*/true).as_int(), ParamError);
  CHECK(Params::scalar("true").as_bool());
  CHECK(did_you_mean("lroa", {"lora", "full", "ia3"}) == "lora");
  CHECK(did_you_mean("zzzzzz", {"lora", "full"}).empty());
}
