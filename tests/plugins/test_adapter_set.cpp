// Named adapters on one base (graft::AdapterSet): switching, routing rows of one batch to
// different adapters, unloading, and the errors each refusal gives.
#include <graft/adapter.h>
#include <graft/adapter_set.h>
#include <graft/error.h>
#include <graft/generate.h>
#include <graft/plugin.h>
#include <torch/torch.h>

#include "method_params.h"
#include "numeric.h"
#include "support.h"
#include "tiny_models.h"

using namespace graft;
using graft::test::nudge;
using graft::test::params;
using graft::test::TempDir;

namespace {

// An adapter folder holding `methods` (name, settings), nudged from `seed`.
void write_adapter(const std::filesystem::path& dir, const std::string& family,
                   const std::vector<std::pair<std::string, Params>>& methods, std::uint64_t seed) {
  auto model = graft::test::tiny_model(family, 5);
  std::vector<std::unique_ptr<Method>> owned;
  std::vector<Method*> raw;
  for (const auto& [name, p] : methods) {
    owned.push_back(make_method(name, p));
    owned.back()->attach(*model);
    nudge(*owned.back(), seed++);
    raw.push_back(owned.back().get());
  }
  save_adapter(dir, *model, raw);
}

}  // namespace

TEST_CASE("a batch routed row by row over named adapters computes each row as alone") {
  graft::test::load_test_plugins();
  for (const std::string family : {"llama", "gpt2"}) {
    CAPTURE(family);
    TempDir dir;
    write_adapter(dir / "a", family,
                  {{"lora", params({{"r", "2"}, {"targets", "[attn.q, ffn.down]"}})}}, 1);
    write_adapter(dir / "b", family, {{"lora", params({{"r", "4"}, {"targets", "[attn.v]"}})}}, 2);
    write_adapter(dir / "c", family,
                  {{"ia3", params({})},
                   {"bitfit", params({{"add_missing", "true"}})},
                   {"pfeiffer", params({{"reduction_factor", "4"}})}},
                  3);
    auto model = graft::test::tiny_model(family, 5);
    const auto ids = torch::tensor(
        {{3, 7, 1, 9}, {4, 2, 5, 6}, {8, 11, 2, 3}, {1, 1, 4, 2}, {9, 3, 3, 7}}, torch::kLong);
    const auto base = graft::test::model_outputs(*model, ids);
    AdapterSet set(*model);
    for (const auto* name : {"a", "b", "c"}) set.load(name, dir / name);
    CHECK(set.names() == std::vector<std::string>{"a", "b", "c"});
    CHECK(set.active() == std::vector<std::string>{"a", "b", "c"});
    std::map<std::string, at::Tensor> alone{{kBaseRoute, base}};
    for (const auto* name : {"a", "b", "c"}) {
      set.set_active({name});
      alone[name] = graft::test::model_outputs(*model, ids);
      CHECK(graft::test::max_diff(alone[name], base) > 1e-3);  // each does something
    }
    const std::vector<std::string> route{"c", "a", kBaseRoute, "b", "a"};
    set.route(route);
    CHECK(set.routed());
    const auto routed = graft::test::model_outputs(*model, ids);
    const auto tol = graft::test::forward_tolerance(*model, routed, ids.size(1));
    for (std::size_t r = 0; r < route.size(); ++r) {
      CAPTURE(r);
      const auto row = static_cast<std::int64_t>(r);
      GRAFT_CHECK_CLOSE(routed[row], alone[route[r]][row], tol);
    }
    // A batch of another size than the route is refused, not silently misrouted.
    CHECK_THROWS_WITH_AS(graft::test::model_outputs(*model, ids.slice(0, 0, 2)),
                         doctest::Contains("per-row routing names 5 rows, but the batch has 2"),
                         Error);
    // Generation keeps the batch: each row continues under its own adapter, with the cache.
    GenerationOptions o;
    o.max_new_tokens = 3;
    CHECK(generate(*model, ids, {}, o).size(0) == ids.size(0));
    set.end_route();
    CHECK(torch::equal(graft::test::model_outputs(*model, ids),
                       alone["c"]));  // set_active({"c"}) again

    set.set_active({});
    CHECK(torch::equal(graft::test::model_outputs(*model, ids), base));
    set.set_active({"a", "b", "c"});
    set.unload("a");
    set.unload("c");
    CHECK(set.active() == std::vector<std::string>{"b"});
    CHECK(torch::equal(graft::test::model_outputs(*model, ids), alone["b"]));
    set.unload("b");
    CHECK(torch::equal(graft::test::model_outputs(*model, ids), base));
  }
}

TEST_CASE("named adapters refuse what they cannot do in one line") {
  graft::test::load_test_plugins();
  TempDir dir;
  write_adapter(dir / "lora", "llama", {{"lora", params({{"r", "2"}})}}, 1);
  write_adapter(dir / "prefix", "llama", {{"prefix_tuning", params({{"num_virtual_tokens", "2"}})}},
                2);
  auto model = graft::test::tiny_model("llama", 5);
  AdapterSet set(*model);
  set.load("x", dir / "lora");
  CHECK_THROWS_WITH_AS(set.load("x", dir / "lora"),
                       doctest::Contains("an adapter named 'x' is loaded already"), Error);
  CHECK_THROWS_WITH_AS(set.load("a b", dir / "lora"), doctest::Contains("adapter name 'a b'"),
                       Error);
  CHECK_THROWS_WITH_AS(set.load(kBaseRoute, dir / "lora"), doctest::Contains("adapter name"),
                       Error);
  CHECK_THROWS_WITH_AS(set.set_active({"y"}),
                       doctest::Contains("no adapter named 'y' is loaded (loaded: x)"), Error);
  CHECK_THROWS_WITH_AS(set.set_active({"x", "x"}), doctest::Contains("'x' is named twice"), Error);
  CHECK_THROWS_WITH_AS(set.route({"x", "z"}), doctest::Contains("no adapter named 'z'"), Error);
  set.load("p", dir / "prefix");
  CHECK_THROWS_WITH_AS(
      set.route({"x", "p"}),
      doctest::Contains("route: adapter 'p' cannot serve some rows of a batch and "
                        "not others: at layers.0.attn.kv it adds key/value prefixes"),
      Error);
  CHECK_FALSE(set.routed());
  // A prefix alone may still be switched on and off.
  const auto ids = torch::tensor({{3, 7, 1}}, torch::kLong);
  set.set_active({});
  const auto base = graft::test::model_outputs(*model, ids);
  set.set_active({"p"});
  CHECK_FALSE(torch::equal(graft::test::model_outputs(*model, ids), base));
  set.set_active({});
  CHECK(torch::equal(graft::test::model_outputs(*model, ids), base));
}

TEST_CASE("LoRA adapters combine as peft's add_weighted_adapter defines each type") {
  graft::test::load_test_plugins();
  TempDir dir;
  write_adapter(dir / "a", "llama", {{"lora", params({{"r", "2"}, {"alpha", "4"}})}}, 1);
  write_adapter(dir / "b", "llama",
                {{"lora", params({{"r", "2"}, {"alpha", "2"}, {"targets", "[attn.v, ffn.up]"}})}},
                2);
  write_adapter(dir / "c", "llama", {{"lora", params({{"r", "3"}})}}, 3);
  const auto ids = torch::tensor({{3, 7, 1, 9}, {4, 2, 5, 6}}, torch::kLong);
  auto delta = [&](const std::vector<std::string>& names, CombineOptions o) {
    auto model = graft::test::tiny_model("llama", 5);
    std::vector<std::filesystem::path> sources;
    for (const auto& n : names) sources.push_back(dir / n);
    auto m = combine_adapters(sources, o, *model);
    return std::make_pair(m->state(), graft::test::model_outputs(*model, ids));
  };
  CombineOptions o;
  o.weights = {0.7, 0.4};
  // cat: B A is the weighted sum of the sources' updates exactly (their products side by side).
  o.type = "cat";
  const auto [cat, cat_logits] = delta({"a", "b"}, o);
  {
    auto model = graft::test::tiny_model("llama", 5);
    AdapterSet set(*model);
    set.load("a", dir / "a");
    set.load("b", dir / "b");
    // The same sum, as two adapters at once with their updates scaled by the weights.
    set.methods("a")[0]->set_scale(0.7);
    set.methods("b")[0]->set_scale(0.4);
    const auto both = graft::test::model_outputs(*model, ids);
    GRAFT_CHECK_CLOSE(cat_logits, both, graft::test::forward_tolerance(*model, both, 4));
  }
  CHECK(cat.at("layers.0.attn.q.lora_A").size(0) == 4);  // rank 2 + 2; b does not adapt attn.q:
  CHECK(cat.at("layers.0.attn.q.lora_A").slice(0, 2).abs().max().item<double>() == 0);  // zero rows
  // svd at the summed rank reproduces the same update; a lower rank does not.
  o.type = "svd";
  o.svd_rank = 4;
  const auto svd4 = delta({"a", "b"}, o).second;
  // An SVD's factors reproduce the matrix within a few units of rounding of its norm, far
  // below the forward's own reordering bound.
  GRAFT_CHECK_CLOSE(svd4, cat_logits,
                    graft::test::reorder_tolerance(
                        cat_logits, graft::test::forward_terms(
                                        graft::test::tiny_model("llama", 5)->config(), 4)));
  o.svd_rank = 1;
  CHECK(graft::test::max_diff(delta({"a", "b"}, o).second, cat_logits) > 1e-3);
  o.svd_clamp = 0.5;  // at the median the factors lose their larger entries
  CHECK(graft::test::max_diff(delta({"a", "b"}, o).second, cat_logits) > 1e-3);
  o.svd_clamp = 0;
  // DARE's masks are the seed's: the same seed gives the same adapter, another another.
  o.type = "dare_ties";
  o.density = 0.5;
  o.seed = 11;
  const auto d1 = delta({"a", "b"}, o).first, d2 = delta({"a", "b"}, o).first;
  o.seed = 12;
  const auto d3 = delta({"a", "b"}, o).first;
  for (const auto& [name, t] : d1) {
    CAPTURE(name);
    CHECK(torch::equal(t, d2.at(name)));
  }
  CHECK_FALSE(torch::equal(d1.at("layers.0.attn.v.lora_A"), d3.at("layers.0.attn.v.lora_A")));
  // ties with density 1 and one source is that source's factors times sqrt(w s).
  o.type = "ties";
  o.density = 1;
  o.weights = {0.5, 0.5};
  const auto ties = delta({"a", "b"}, o).first;
  {
    auto model = graft::test::tiny_model("llama", 5);
    AdapterSet set(*model);
    set.load("a", dir / "a");
    const auto a = set.methods("a")[0]->state();
    const double v = std::sqrt(0.5 * 4.0 / 2.0);  // sqrt(w * alpha / r)
    GRAFT_CHECK_CLOSE(
        ties.at("layers.0.attn.q.lora_A"), a.at("layers.0.attn.q.lora_A") * v,
        4 * graft::test::kUnit32 * graft::test::max_abs(ties.at("layers.0.attn.q.lora_A")));
  }
  // Refusals, one line each.
  o.type = "linear";
  CHECK_THROWS_WITH_AS(delta({"a", "c"}, o), doctest::Contains("ranks must be equal"), Error);
  o.weights = {0.5, -0.5};
  CHECK_THROWS_WITH_AS(delta({"a", "b"}, o), doctest::Contains("must not be negative"), Error);
  o.type = "average";
  o.weights = {0.5, 0.5};
  CHECK_THROWS_WITH_AS(delta({"a", "b"}, o),
                       doctest::Contains("'average' is not a way to combine lora adapters"), Error);
  o.type = "linear";
  o.weights = {1.0};
  CHECK_THROWS_WITH_AS(delta({"a"}, o), doctest::Contains("two adapters or more"), Error);
  write_adapter(dir / "p", "llama", {{"prompt_tuning", params({{"num_virtual_tokens", "2"}})}}, 4);
  o.weights = {0.5, 0.5};
  CHECK_THROWS_WITH_AS(delta({"a", "p"}, o), doctest::Contains("a prompt_tuning adapter, but"),
                       Error);
}

TEST_CASE("IA3 and bottleneck adapters combine linearly, tensor by tensor") {
  graft::test::load_test_plugins();
  TempDir dir;
  const auto ids = torch::tensor({{3, 7, 1, 9}, {4, 2, 5, 6}}, torch::kLong);
  for (const std::string method : {"ia3", "pfeiffer", "houlsby", "parallel"}) {
    CAPTURE(method);
    const auto settings = method == "ia3" ? params({}) : params({{"reduction_factor", "4"}});
    write_adapter(dir / (method + "1"), "llama", {{method, settings}}, 1);
    write_adapter(dir / (method + "2"), "llama", {{method, settings}}, 2);
    const std::vector<std::filesystem::path> sources{dir / (method + "1"), dir / (method + "2")};
    CombineOptions o;
    o.type = "linear";
    // Weights 1 and 0 give the first adapter exactly (x * 1 and + 0 * y round to nothing).
    o.weights = {1.0, 0.0};
    auto model = graft::test::tiny_model("llama", 5);
    {
      const auto first = combine_adapters(sources, o, *model);
      const auto combined = graft::test::model_outputs(*model, ids);
      first->detach(*model);
      AdapterSet set(*model);
      set.load("first", sources[0]);
      CHECK(torch::equal(combined, graft::test::model_outputs(*model, ids)));
    }
    // Weights 0.5 and 0.5: each tensor the mean of the two.
    o.weights = {0.5, 0.5};
    const auto mean = combine_adapters(sources, o, *model);
    AdapterSet set(*model);
    set.load("one", sources[0]);
    set.load("two", sources[1]);
    const auto one = set.methods("one")[0]->state(), two = set.methods("two")[0]->state();
    for (const auto& [name, t] : mean->state()) {
      CAPTURE(name);
      CHECK(torch::equal(t, one.at(name) * 0.5 + two.at(name) * 0.5));
    }
  }
  // Sources of other settings are not summed.
  write_adapter(dir / "ia3k", "llama", {{"ia3", params({{"targets", "[attn.k]"}})}}, 3);
  CombineOptions o;
  o.type = "linear";
  o.weights = {0.5, 0.5};
  auto model = graft::test::tiny_model("llama", 5);
  CHECK_THROWS_WITH_AS(combine_adapters({dir / "ia31", dir / "ia3k"}, o, *model),
                       doctest::Contains("ia3 combine: source 2's targets"), Error);
}
