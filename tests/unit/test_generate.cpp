#include <graft/generate.h>
#include <graft/load.h>
#include <torch/torch.h>

#include <fstream>

#include "models/common.h"
#include "models/families.h"
#include "numeric.h"
#include "support.h"
#include "tiny_models.h"

using namespace graft;

namespace {

std::shared_ptr<Model> tiny(const std::string& family, std::uint64_t seed) {
  return graft::test::tiny_model(family, seed, 0.5);
}

}  // namespace

TEST_CASE("stories260K: greedy decoding from BOS reproduces the documented sample byte for byte") {
  GRAFT_MODEL_OR_SKIP(file, "stories260K");
  const auto sample = file.parent_path() / "greedy-sample.txt";
  GRAFT_SKIP_UNLESS_EXISTS(sample);
  std::ifstream in(sample, std::ios::binary);
  const std::string expected{std::istreambuf_iterator<char>(in), {}};
  auto loaded = load_model(file.string());
  std::int64_t params = 0;
  for (const auto& p : loaded.model->parameters()) params += p.numel();
  CHECK(params == 260032);  // as documented in the model's NOTICE
  GenerationOptions o;
  o.max_new_tokens = 256;  // llama2.c's default: 256 positions after BOS
  auto prompt = torch::tensor(loaded.tokenizer->encode(""), torch::kLong).unsqueeze(0);
  REQUIRE(prompt.size(1) == 1);
  auto out = generate(*loaded.model, prompt, {}, o);
  std::vector<std::int64_t> ids(out.data_ptr<std::int64_t>(),
                                out.data_ptr<std::int64_t>() + out.numel());
  CHECK(loaded.tokenizer->decode(ids) + "\n" == expected);
}

TEST_CASE("KV-cache generation equals full recomputation, with left padding") {
  for (const std::string family : {"llama", "gpt2"}) {
    CAPTURE(family);
    auto m = tiny(family, 21);
    auto ids = torch::tensor({0, 0, 5, 9, 3, 7, 11, 13, 2, 4}, torch::kLong).view({2, 5});
    auto mask = torch::tensor({0, 0, 1, 1, 1, 1, 1, 1, 1, 1}, torch::kLong).view({2, 5});
    GenerationOptions o;
    o.max_new_tokens = 12;
    auto cached = generate(*m, ids, mask, o);
    o.use_cache = false;
    auto full = generate(*m, ids, mask, o);
    CHECK(torch::equal(cached, full));
    // A left-padded row continues exactly as it does alone.
    o.use_cache = true;
    auto alone = generate(*m, ids.slice(1, 2).narrow(0, 0, 1), {}, o);
    CHECK(torch::equal(cached[0], alone[0]));

    // The cached logits themselves match a full forward pass.
    torch::NoGradGuard ng;
    KVCache cache;
    auto first = m->forward({ids.slice(1, 0, 3), mask.slice(1, 0, 3), {}, {}}, &cache);
    auto rest = m->forward({ids.slice(1, 3), mask.slice(1, 3), {}, {}}, &cache);
    auto whole = m->forward({ids, mask, {}, {}}, nullptr);
    CHECK(cache.length() == 5);
    const auto tolerance =
        graft::test::reorder_tolerance(whole.logits, graft::test::forward_terms(m->config(), 5));
    GRAFT_CHECK_CLOSE(rest.logits, whole.logits.slice(1, 3), tolerance);
    GRAFT_CHECK_CLOSE(first.logits.select(0, 1), whole.logits.select(0, 1).slice(0, 0, 3),
                      tolerance);
  }
}

TEST_CASE("sampling is reproducible from its seed and respects top-k and top-p") {
  auto m = tiny("llama", 22);
  auto ids = torch::tensor({1, 2, 3}, torch::kLong).view({1, 3});
  GenerationOptions o;
  o.max_new_tokens = 16;
  o.temperature = 1.5;
  o.seed = 7;
  auto a = generate(*m, ids, {}, o), b = generate(*m, ids, {}, o);
  CHECK(torch::equal(a, b));
  o.seed = 8;
  CHECK_FALSE(torch::equal(a, generate(*m, ids, {}, o)));
  o.top_k = 1;  // only the most likely token: greedy
  GenerationOptions greedy;
  greedy.max_new_tokens = 16;
  CHECK(torch::equal(generate(*m, ids, {}, o), generate(*m, ids, {}, greedy)));

  auto logits = torch::tensor({0.0, 3.0, 1.0, 2.9});
  GenerationOptions p;
  p.temperature = 1.0;
  p.top_p = 0.01;  // the nucleus is the single most likely token
  std::uint64_t state = 1;
  for (int i = 0; i < 20; ++i) CHECK(choose_token(logits, p, state) == 1);
  p.top_p = 1.0;
  p.top_k = 2;  // only ids 1 and 3 can be drawn
  std::set<std::int64_t> seen;
  for (int i = 0; i < 200; ++i) seen.insert(choose_token(logits, p, state));
  CHECK(seen == std::set<std::int64_t>{1, 3});
}

TEST_CASE("generation stops a row at its stop token") {
  auto m = tiny("llama", 23);
  auto ids = torch::tensor({1, 2, 3, 4, 5, 6}, torch::kLong).view({2, 3});
  GenerationOptions o;
  o.max_new_tokens = 8;
  auto free_run = generate(*m, ids, {}, o);
  o.stop_ids = {free_run[0][2].item<std::int64_t>()};
  auto stopped = generate(*m, ids, {}, o);
  // Row 0 stops at (or before) step 2 and is filled with -1 after its stop token.
  std::int64_t stop_at = -1;
  for (std::int64_t t = 0; t < stopped.size(1); ++t)
    if (stopped[0][t].item<std::int64_t>() == o.stop_ids[0]) {
      stop_at = t;
      break;
    }
  REQUIRE(stop_at >= 0);
  CHECK(stop_at <= 2);
  for (std::int64_t t = stop_at + 1; t < stopped.size(1); ++t)
    CHECK(stopped[0][t].item<std::int64_t>() == -1);
}
