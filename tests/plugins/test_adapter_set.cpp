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
using graft::test::params;
using graft::test::TempDir;

namespace {

// Trains nothing: moves every trainable tensor off its initial value so the method does something.
void nudge(Method& m, std::uint64_t seed) {
  torch::NoGradGuard ng;
  torch::manual_seed(seed);
  for (auto& [name, t] : m.trainable_parameters()) t.add_(torch::randn_like(t) * 0.3);
}

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

at::Tensor logits(Model& m, const at::Tensor& ids) {
  torch::NoGradGuard ng;
  return m.forward({ids, {}, {}, {}}, nullptr).logits;
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
    const auto base = logits(*model, ids);
    AdapterSet set(*model);
    for (const auto* name : {"a", "b", "c"}) set.load(name, dir / name);
    CHECK(set.names() == std::vector<std::string>{"a", "b", "c"});
    CHECK(set.active() == std::vector<std::string>{"a", "b", "c"});
    std::map<std::string, at::Tensor> alone{{kBaseRoute, base}};
    for (const auto* name : {"a", "b", "c"}) {
      set.set_active({name});
      alone[name] = logits(*model, ids);
      CHECK(graft::test::max_diff(alone[name], base) > 1e-3);  // each does something
    }
    const std::vector<std::string> route{"c", "a", kBaseRoute, "b", "a"};
    set.route(route);
    CHECK(set.routed());
    const auto routed = logits(*model, ids);
    const auto tol = graft::test::forward_tolerance(*model, routed, ids.size(1));
    for (std::size_t r = 0; r < route.size(); ++r) {
      CAPTURE(r);
      const auto row = static_cast<std::int64_t>(r);
      GRAFT_CHECK_CLOSE(routed[row], alone[route[r]][row], tol);
    }
    // A batch of another size than the route is refused, not silently misrouted.
    CHECK_THROWS_WITH_AS(logits(*model, ids.slice(0, 0, 2)),
                         doctest::Contains("per-row routing names 5 rows, but the batch has 2"),
                         Error);
    // Generation keeps the batch: each row continues under its own adapter, with the cache.
    GenerationOptions o;
    o.max_new_tokens = 3;
    CHECK(generate(*model, ids, {}, o).size(0) == ids.size(0));
    set.end_route();
    CHECK(torch::equal(logits(*model, ids), alone["c"]));  // set_active({"c"}) again

    set.set_active({});
    CHECK(torch::equal(logits(*model, ids), base));
    set.set_active({"a", "b", "c"});
    set.unload("a");
    set.unload("c");
    CHECK(set.active() == std::vector<std::string>{"b"});
    CHECK(torch::equal(logits(*model, ids), alone["b"]));
    set.unload("b");
    CHECK(torch::equal(logits(*model, ids), base));
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
  const auto base = logits(*model, ids);
  set.set_active({"p"});
  CHECK_FALSE(torch::equal(logits(*model, ids), base));
  set.set_active({});
  CHECK(torch::equal(logits(*model, ids), base));
}
