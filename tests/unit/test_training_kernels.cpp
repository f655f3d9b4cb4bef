// The training step's hand-written pieces against the plain libtorch expressions they replace:
// the rotary embedding, attention core and SwiGLU with their own backward passes, and the LM
// loss computed in chunks of rows with its gradient worked out on the way.
#include <doctest/doctest.h>
#include <torch/torch.h>

#include <cmath>
#include <limits>

#include "models/common.h"
#include "models/fused.h"
#include "numeric.h"
#include "recipe/loss.h"
#include "tiny_models.h"

using namespace graft;
using namespace graft::test;

namespace {

// The expressions autograd differentiates on its own.
at::Tensor plain_rotate(const at::Tensor& x, const at::Tensor& c, const at::Tensor& s,
                        RopeStyle style) {
  const auto half = x.size(-1) / 2;
  if (style == RopeStyle::interleaved) {
    auto pairs = x.unflatten(-1, {half, 2});
    auto x0 = pairs.select(-1, 0), x1 = pairs.select(-1, 1);
    return torch::stack({x0 * c - x1 * s, x0 * s + x1 * c}, -1).flatten(-2);
  }
  auto x0 = x.narrow(-1, 0, half), x1 = x.narrow(-1, half, half);
  return torch::cat({x0 * c - x1 * s, x1 * c + x0 * s}, -1);
}

at::Tensor plain_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                           const at::Tensor& allowed) {
  auto scores = torch::matmul(q, k.transpose(-2, -1)) / std::sqrt(double(q.size(-1)));
  scores = scores.masked_fill(allowed.logical_not(), std::numeric_limits<float>::lowest());
  return torch::matmul(torch::softmax(scores, -1), v);
}

// Gradients of sum(f(inputs) * upstream) with respect to each input.
template <typename F>
std::vector<at::Tensor> gradients(F f, std::vector<at::Tensor> inputs, const at::Tensor& upstream) {
  for (auto& t : inputs) t = t.detach().clone().requires_grad_(true);
  (f(inputs) * upstream).sum().backward();
  std::vector<at::Tensor> out;
  for (auto& t : inputs) out.push_back(t.grad());
  return out;
}

}  // namespace

TEST_CASE("the rotary embedding's own backward is autograd's, in both pairings") {
  torch::manual_seed(3);
  const std::int64_t batch = 2, heads = 3, seq = 5, dim = 8;
  auto positions = torch::arange(seq).repeat({batch, 1}) + torch::tensor({0, 4}).unsqueeze(1);
  auto [cos, sin] = models::rope_tables(positions, dim, 10000.0);
  auto x = torch::randn({batch, heads, seq, dim});
  auto up = torch::randn({batch, heads, seq, dim});
  for (auto style : {RopeStyle::half_split, RopeStyle::interleaved}) {
    CAPTURE(static_cast<int>(style));
    CHECK(torch::equal(models::rotate(x, cos, sin, style), plain_rotate(x, cos, sin, style)));
    auto fused =
        gradients([&](auto& in) { return models::rotate(in[0], cos, sin, style); }, {x}, up);
    auto plain = gradients([&](auto& in) { return plain_rotate(in[0], cos, sin, style); }, {x}, up);
    // Each gradient element is a sum of two products.
    GRAFT_CHECK_CLOSE(fused[0], plain[0], reorder_tolerance(plain[0], 4));
    CHECK(max_diff(fused[0], up) > 100 * reorder_tolerance(plain[0], 4));  // it does rotate
  }
}

TEST_CASE("the attention core's recomputing backward is autograd's, masked rows included") {
  torch::manual_seed(4);
  const std::int64_t batch = 2, heads = 3, seq = 6, keys = 7, dim = 8;
  auto q = torch::randn({batch, heads, seq, dim});
  auto k = torch::randn({batch, heads, keys, dim});
  auto v = torch::randn({batch, heads, keys, dim});
  // Causal over the last `seq` of the keys, the second row's first two keys padding, and one
  // query of the first row that may see nothing at all.
  auto qpos = torch::arange(keys - seq, keys).view({seq, 1});
  auto allowed = (torch::arange(keys).view({1, keys}) <= qpos)
                     .view({1, 1, seq, keys})
                     .repeat({batch, 1, 1, 1});
  allowed.index_put_({1, 0, torch::indexing::Slice(), torch::indexing::Slice(0, 2)}, false);
  allowed.index_put_({0, 0, 2}, false);
  auto up = torch::randn({batch, heads, seq, dim});
  CHECK(torch::equal(models::attention_core(q, k, v, allowed), plain_attention(q, k, v, allowed)));
  auto fused =
      gradients([&](auto& in) { return models::attention_core(in[0], in[1], in[2], allowed); },
                {q, k, v}, up);
  auto plain = gradients([&](auto& in) { return plain_attention(in[0], in[1], in[2], allowed); },
                         {q, k, v}, up);
  // Chains: the scores (dim terms), the softmax and its backward (keys terms each), the products
  // with v and the upstream gradient (keys or seq terms), a few element-wise operations.
  const std::int64_t terms = 2 * dim + 3 * keys + seq + 8;
  for (int i = 0; i < 3; ++i) {
    CAPTURE(i);
    GRAFT_CHECK_CLOSE(fused[i], plain[i], reorder_tolerance(plain[i], terms));
    CHECK(max_abs(plain[i]) > 100 * reorder_tolerance(plain[i], terms));
  }
}

TEST_CASE("SwiGLU's own backward is autograd's") {
  torch::manual_seed(5);
  auto gate = torch::randn({4, 9}) * 3, up = torch::randn({4, 9}), g = torch::randn({4, 9});
  CHECK(torch::equal(models::swiglu(gate, up), torch::silu(gate) * up));
  auto fused = gradients([](auto& in) { return models::swiglu(in[0], in[1]); }, {gate, up}, g);
  auto plain = gradients([](auto& in) { return torch::silu(in[0]) * in[1]; }, {gate, up}, g);
  for (int i = 0; i < 2; ++i) GRAFT_CHECK_CLOSE(fused[i], plain[i], reorder_tolerance(plain[i], 8));
}

TEST_CASE("the chunked LM loss is the full-vocabulary cross-entropy, with the same gradients") {
  auto c = tiny_config("llama");
  c.vocab_size = 97;
  for (bool tied : {false, true}) {
    CAPTURE(tied);
    c.tie_embeddings = tied;
    auto model = models::make_model(c);
    models::init_parameters(*model, 7, 0.3);
    // Two rows of 9 tokens, the second with three positions padded and one target ignored.
    Batch b;
    b.input_ids = torch::randint(c.vocab_size, {2, 9}, torch::kLong);
    b.attention_mask = torch::ones({2, 9}, torch::kLong);
    b.attention_mask.index_put_({1, torch::indexing::Slice(6, 9)}, 0);
    b.labels = b.input_ids.masked_fill(b.attention_mask.eq(0), -100);
    b.labels.index_put_({0, 4}, -100);

    // The reference: every logit at once, through the head's own forward.
    auto reference = [&] {
      auto logits = model->forward({b.input_ids, b.attention_mask, {}, {}}, nullptr).logits;
      auto pred = logits.slice(1, 0, -1).reshape({-1, c.vocab_size});
      auto target = b.labels.slice(1, 1).reshape({-1});
      auto n = target.ne(-100).sum();
      return torch::nn::functional::cross_entropy(
                 pred, target,
                 torch::nn::functional::CrossEntropyFuncOptions().ignore_index(-100).reduction(
                     torch::kSum)) /
             n;
    };
    auto grads = [&](const at::Tensor& loss) {
      model->zero_grad();
      loss.backward();
      std::vector<at::Tensor> g;
      for (auto& p : model->parameters()) g.push_back(p.grad().clone());
      return g;
    };
    const auto ref_loss = reference();
    const auto ref_grads = grads(ref_loss);
    const std::int64_t n = 2 * 8;
    // The head's dot products (d), the log-sum-exp (vocabulary), the sum over targets (n), then
    // the backward through the whole network.
    const std::int64_t terms = 2 * forward_terms(c, 9) + c.vocab_size + n;
    for (std::int64_t rows : {std::int64_t{0}, std::int64_t{1}, std::int64_t{5},
                              n}) {  // one chunk, one row at a time, ragged, exact
      CAPTURE(rows);
      auto parts = causal_lm_loss(*model, b, rows);
      CHECK(parts.targets == 2 * 8 - 4);
      GRAFT_CHECK_CLOSE(parts.loss, ref_loss, reorder_tolerance(ref_loss, terms));
      const auto g = grads(parts.loss);
      REQUIRE(g.size() == ref_grads.size());
      for (std::size_t i = 0; i < g.size(); ++i)
        GRAFT_CHECK_CLOSE(g[i], ref_grads[i], reorder_tolerance(ref_grads[i], terms));

      torch::NoGradGuard no_grad;
      const auto s = score_causal_lm(*model, b, rows);
      CHECK(s.scored == parts.targets);
      CHECK(std::abs(s.loss_sum / s.scored - ref_loss.item<double>()) <=
            reorder_tolerance(ref_loss, terms));
      auto logits = model->forward({b.input_ids, b.attention_mask, {}, {}}, nullptr).logits;
      auto target = b.labels.slice(1, 1);
      auto hits = (logits.slice(1, 0, -1).argmax(-1).eq(target) & target.ne(-100)).sum();
      CHECK(s.correct == hits.item<std::int64_t>());
    }
  }
}

TEST_CASE("bf16 autocast: products in bfloat16, float32 loss and master-weight gradients") {
  auto c = tiny_config("llama");
  c.vocab_size = 97;
  auto model = models::make_model(c);
  models::init_parameters(*model, 9, 0.3);
  torch::manual_seed(9);  // the same batch every run
  Batch b;
  b.input_ids = torch::randint(c.vocab_size, {2, 9}, torch::kLong);
  b.attention_mask = torch::ones({2, 9}, torch::kLong);
  b.labels = b.input_ids.clone();
  auto loss_and_grads = [&](bool bf16) {
    model->zero_grad();
    at::Tensor loss;
    {
      Autocast autocast(bf16, torch::kCPU);
      loss = causal_lm_loss(*model, b).loss;
    }
    loss.backward();  // outside autocast, as the trainer does
    std::vector<at::Tensor> g;
    for (auto& p : model->parameters()) g.push_back(p.grad().clone());
    return std::pair{loss.detach(), g};
  };
  const auto [f32, g32] = loss_and_grads(false);
  const auto [bf, gbf] = loss_and_grads(true);
  CHECK((bf.scalar_type() == torch::kFloat));
  const auto m = torch::randn({3, 3});
  CHECK((torch::mm(m, m).scalar_type() == torch::kFloat));  // the guard turned autocast off again
  {
    Autocast autocast(true, torch::kCPU);
    CHECK((torch::mm(m, m).scalar_type() == torch::kBFloat16));
  }
  for (const auto& g : gbf) CHECK((g.scalar_type() == torch::kFloat));
  // Each product rounds both operands to bfloat16 (2^-8 relative each); the logits pass through
  // `depth` products (q/k/v, scores, mix, o, gate/up, down per layer, then the head), and the loss
  // moves by at most twice the largest change of a logit.
  const double depth = 6.0 * c.num_layers + 1;
  torch::NoGradGuard no_grad;
  const auto logits = model->forward({b.input_ids, b.attention_mask, {}, {}}, nullptr).logits;
  const double bound = 2 * depth * 2 * 0x1p-8 * max_abs(logits);
  CHECK(max_diff(bf, f32) <= bound);
  // Not float32: the logits under autocast move by more than any reordering of float32 sums
  // could (checked on the 2 x 9 x 97 logits: the loss, one mean, may average the roundings out).
  at::Tensor logits_bf;
  {
    Autocast autocast(true, torch::kCPU);
    logits_bf = model->forward({b.input_ids, b.attention_mask, {}, {}}, nullptr).logits;
  }
  CHECK(max_diff(logits_bf.to(torch::kFloat), logits) >
        reorder_tolerance(logits, forward_terms(c, 9)));
  bool some_gradient_moved = false;
  for (std::size_t i = 0; i < g32.size(); ++i)
    some_gradient_moved |= max_diff(gbf[i], g32[i]) > reorder_tolerance(g32[i], 64);
  CHECK(some_gradient_moved);
}
