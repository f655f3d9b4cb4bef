#include <graft/generate.h>
#include <torch/torch.h>

#include <algorithm>
#include <cmath>
#include <numeric>

namespace graft {
namespace {

// splitmix64: a small, fully specified generator, so a seed gives the same samples with every
// standard library and libtorch version.
double next_uniform(std::uint64_t& state) {
  std::uint64_t z = (state += 0x9E3779B97F4A7C15ull);
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  z ^= z >> 31;
  return static_cast<double>(z >> 11) * 0x1.0p-53;
}

}  // namespace

std::int64_t choose_token(const at::Tensor& logits, const GenerationOptions& o,
                          std::uint64_t& state) {
  auto row = logits.to(torch::kCPU, torch::kDouble).contiguous();
  const double* l = row.data_ptr<double>();
  const auto n = row.numel();
  if (o.temperature <= 0) return static_cast<std::int64_t>(std::max_element(l, l + n) - l);

  std::vector<std::int64_t> order(n);
  std::iota(order.begin(), order.end(), 0);
  // Highest logit first; ties by lower id, so the order is fully determined.
  std::stable_sort(order.begin(), order.end(), [&](auto a, auto b) { return l[a] > l[b]; });
  std::int64_t keep = o.top_k > 0 ? std::min<std::int64_t>(o.top_k, n) : n;
  std::vector<double> p(keep);
  const double top = l[order[0]];
  double sum = 0;
  for (std::int64_t i = 0; i < keep; ++i)
    sum += p[i] = std::exp((l[order[i]] - top) / o.temperature);
  if (o.top_p < 1.0) {
    double cum = 0;
    std::int64_t k = 0;
    while (k < keep) {
      cum += p[k++] / sum;
      if (cum >= o.top_p) break;
    }
    keep = k;
    sum = std::accumulate(p.begin(), p.begin() + keep, 0.0);
  }
  double u = next_uniform(state) * sum;
  for (std::int64_t i = 0; i < keep; ++i) {
    u -= p[i];
    if (u < 0) return order[i];
  }
  return order[keep - 1];
}

at::Tensor generate(Model& model, const at::Tensor& input_ids, const at::Tensor& attention_mask,
                    const GenerationOptions& o,
                    const std::function<void(const at::Tensor&)>& on_step) {
  TORCH_CHECK(input_ids.dim() == 2, "generate: input_ids must be [batch, seq]");
  TORCH_CHECK(model.causal(), "generate: the model is not a causal language model");
  torch::NoGradGuard no_grad;
  const bool was_training = model.is_training();
  model.eval();
  const auto batch = input_ids.size(0);
  auto mask =
      attention_mask.defined() ? attention_mask.to(torch::kLong) : torch::ones_like(input_ids);
  std::uint64_t state = o.seed;
  std::vector<bool> done(batch, false);
  std::vector<at::Tensor> steps;

  KVCache cache;
  auto ids = input_ids, full_ids = input_ids, full_mask = mask;
  ForwardInput in{input_ids, mask, {}, {}};
  // The head on each row's last position only: the prompt's other positions need no logits.
  auto last_logits = [&](ForwardInput fin, KVCache* c) {
    fin.hidden_only = true;
    auto out = model.forward(fin, c);
    if (out.logits.defined()) return out.logits.select(1, out.logits.size(1) - 1);
    return model.linear("head")->forward(out.hidden.select(1, out.hidden.size(1) - 1));
  };
  for (std::int64_t step = 0; step < o.max_new_tokens; ++step) {
    auto last =
        o.use_cache ? last_logits(in, &cache) : last_logits({full_ids, full_mask, {}, {}}, nullptr);
    std::vector<std::int64_t> next(batch);
    for (std::int64_t b = 0; b < batch; ++b) {
      next[b] = done[b] ? -1 : choose_token(last[b], o, state);
      if (!done[b] && std::find(o.stop_ids.begin(), o.stop_ids.end(), next[b]) != o.stop_ids.end())
        done[b] = true;
    }
    auto chosen = torch::tensor(next, torch::kLong).to(input_ids.device());
    steps.push_back(chosen);
    if (on_step) on_step(chosen);
    if (std::all_of(done.begin(), done.end(), [](bool d) { return d; })) break;
    // Finished rows keep decoding a masked token so that the batch stays rectangular.
    auto feed = chosen.clamp_min(0).unsqueeze(1);
    auto feed_mask = (chosen >= 0).to(torch::kLong).unsqueeze(1);
    in = ForwardInput{feed, feed_mask, {}, {}};
    full_ids = torch::cat({full_ids, feed}, 1);
    full_mask = torch::cat({full_mask, feed_mask}, 1);
  }
  if (was_training) model.train();
  if (steps.empty()) return torch::empty({batch, 0}, input_ids.options().dtype(torch::kLong));
  return torch::stack(steps, 1);
}

}  // namespace graft
