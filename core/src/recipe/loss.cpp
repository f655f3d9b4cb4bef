#include "recipe/loss.h"

#include <ATen/autocast_mode.h>
#include <ATen/record_function.h>
#include <torch/torch.h>
#include <torch/version.h>

#include <algorithm>

namespace graft {
namespace {

namespace F = torch::nn::functional;
using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

// Rows of logits computed at once: 2^23 values (32 MiB in float32), so that neither the
// [tokens, vocabulary] logits nor their gradient is ever held whole.
constexpr std::int64_t kChunkValues = std::int64_t{1} << 23;

std::int64_t rows_per_chunk(std::int64_t asked, std::int64_t vocab) {
  return asked > 0 ? asked : std::max<std::int64_t>(1, kChunkValues / vocab);
}

// The next-token inputs and targets: hidden states [N, d] of positions 0..T-2 and the labels of
// positions 1..T-1 [N].
struct Shifted {
  at::Tensor hidden, target;
};

Shifted shifted(const at::Tensor& hidden, const Batch& b) {
  return {hidden.slice(1, 0, -1).reshape({-1, hidden.size(-1)}),
          b.labels.slice(1, 1).reshape({-1})};
}

// One chunk's logits in float32, their log-sum-exp, the targets' logits and which rows count.
struct Chunk {
  at::Tensor logits, lse, picked, valid, target;
};

Chunk score_chunk(const at::Tensor& logits, const at::Tensor& target) {
  Chunk c;
  c.logits = logits.to(torch::kFloat);
  c.valid = target.ne(-100);
  c.target = target.masked_fill(c.valid.logical_not(), 0).unsqueeze(1);
  c.lse = c.logits.logsumexp(-1);
  c.picked = c.logits.gather(1, c.target).squeeze(1);
  return c;
}

// The summed cross-entropy of the head `weight` [V, d] over hidden [N, d] and target [N], in
// chunks of rows. With gradients wanted, each chunk's gradient (softmax minus the target's one
// hot) goes straight into the gradients of hidden and weight while the chunk is at hand, so the
// backward pass only scales them: the products are the ones an unchunked loss performs, and no
// chunk is computed twice.
class ChunkedHeadLoss : public torch::autograd::Function<ChunkedHeadLoss> {
 public:
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& hidden,
                            const at::Tensor& weight, const at::Tensor& target, std::int64_t rows) {
    const bool grad_hidden = ctx->needs_input_grad(0), grad_weight = ctx->needs_input_grad(1);
    const auto n = hidden.size(0);
    auto loss = torch::zeros({}, hidden.options().dtype(torch::kFloat));
    at::Tensor dh = grad_hidden ? torch::empty_like(hidden) : at::Tensor();
    at::Tensor dw = grad_weight ? torch::zeros_like(weight) : at::Tensor();
    for (std::int64_t start = 0; start < n; start += rows) {
      const auto len = std::min(rows, n - start);
      const auto h = hidden.narrow(0, start, len);
      auto c = score_chunk(at::mm(h, weight.t()), target.narrow(0, start, len));
      const auto valid = c.valid.to(torch::kFloat);
      loss += ((c.lse - c.picked) * valid).sum();
      if (!grad_hidden && !grad_weight) continue;
      // d loss / d logits = softmax - one_hot(target), on the rows that count; in place.
      auto g = c.logits.sub_(c.lse.unsqueeze(1)).exp_();
      g.scatter_add_(1, c.target, -torch::ones_like(c.target, g.options()));
      g.mul_(valid.unsqueeze(1));
      const auto gw = g.to(weight.scalar_type());
      if (grad_hidden) dh.narrow(0, start, len).copy_(at::mm(gw, weight));
      if (grad_weight) dw.addmm_(gw.t(), h);
    }
    ctx->save_for_backward({dh, dw});
    return loss;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_output) {
    const auto saved = ctx->get_saved_variables();
    const auto& g = grad_output[0];
    auto scaled = [&](const at::Tensor& t) {
      return t.defined() ? t * g.to(t.scalar_type()) : at::Tensor();
    };
    return {scaled(saved[0]), scaled(saved[1]), at::Tensor(), at::Tensor()};
  }
};

// The head's weight when the chunked loss can compute the head itself: a plain projection, or
// one whose only hooks transform the weight. Undefined otherwise (a delta, scale or bias on the
// head: the loss then goes through the head's own forward).
at::Tensor plain_head_weight(Model& model) {
  auto* head = model.linear("head");
  if (!head || head->bias.defined()) return {};
  const auto& h = model.hooks("head");
  if (!h.deltas.empty() || !h.scales.empty() || !h.transforms.empty()) return {};
  return head->effective_weight();
}

ForwardOutput hidden_states(Model& model, const Batch& b) {
  ForwardInput in{b.input_ids, b.attention_mask, {}, {}};
  in.hidden_only = true;
  return model.forward(in, nullptr);
}

}  // namespace

std::int64_t causal_lm_targets(const Batch& batch) {
  return batch.labels.slice(1, 1).ne(-100).sum().item<std::int64_t>();
}

LossParts causal_lm_loss(Model& model, const Batch& batch, std::int64_t chunk_rows) {
  auto out = hidden_states(model, batch);
  RECORD_USER_SCOPE("graft::loss");
  auto [hidden, target] = shifted(out.hidden, batch);
  const auto n = causal_lm_targets(batch);
  at::Tensor loss;
  if (auto weight = plain_head_weight(model); weight.defined()) {
    loss =
        ChunkedHeadLoss::apply(hidden, weight, target, rows_per_chunk(chunk_rows, weight.size(0)));
  } else {
    auto logits = model.linear("head")->forward(hidden).to(torch::kFloat);
    loss = F::cross_entropy(logits, target,
                            F::CrossEntropyFuncOptions().ignore_index(-100).reduction(torch::kSum));
  }
  return {loss / std::max<std::int64_t>(n, 1), n, loss};
}

LmScore score_causal_lm(Model& model, const Batch& batch, std::int64_t chunk_rows) {
  torch::NoGradGuard no_grad;
  auto out = hidden_states(model, batch);
  auto [hidden, target] = shifted(out.hidden, batch);
  auto* head = model.linear("head");
  const auto weight = plain_head_weight(model);
  const auto n = hidden.size(0), rows = rows_per_chunk(chunk_rows, head->out_features);
  const auto on = torch::TensorOptions().device(hidden.device());  // sums stay on the device
  auto loss = torch::zeros({}, on.dtype(torch::kDouble));
  auto correct = torch::zeros({}, on.dtype(torch::kLong));
  LmScore s;
  for (std::int64_t start = 0; start < n; start += rows) {
    const auto len = std::min(rows, n - start);
    const auto h = hidden.narrow(0, start, len);
    const auto t = target.narrow(0, start, len);
    // The plain head as one product, else the head's own forward; a chunk at a time either way.
    const auto c = score_chunk(weight.defined() ? at::mm(h, weight.t()) : head->forward(h), t);
    loss += ((c.lse - c.picked) * c.valid).sum().to(torch::kDouble);
    correct += (c.logits.argmax(-1).eq(t) & c.valid).sum();
    s.scored += c.valid.sum().item<std::int64_t>();
  }
  s.loss_sum = loss.item<double>();
  s.correct = correct.item<std::int64_t>();
  return s;
}

// libtorch 2.4 names the device in one call where earlier versions had one call per device.
#if TORCH_VERSION_MAJOR > 2 || (TORCH_VERSION_MAJOR == 2 && TORCH_VERSION_MINOR >= 4)
#define GRAFT_AUTOCAST_BY_DEVICE 1
#endif

namespace {

bool autocast_enabled(bool cuda) {
#ifdef GRAFT_AUTOCAST_BY_DEVICE
  return at::autocast::is_autocast_enabled(cuda ? at::kCUDA : at::kCPU);
#else
  return cuda ? at::autocast::is_enabled() : at::autocast::is_cpu_enabled();
#endif
}

at::ScalarType autocast_dtype(bool cuda) {
#ifdef GRAFT_AUTOCAST_BY_DEVICE
  return at::autocast::get_autocast_dtype(cuda ? at::kCUDA : at::kCPU);
#else
  return cuda ? at::autocast::get_autocast_gpu_dtype() : at::autocast::get_autocast_cpu_dtype();
#endif
}

void set_autocast(bool cuda, bool enabled, at::ScalarType dtype) {
#ifdef GRAFT_AUTOCAST_BY_DEVICE
  at::autocast::set_autocast_enabled(cuda ? at::kCUDA : at::kCPU, enabled);
  at::autocast::set_autocast_dtype(cuda ? at::kCUDA : at::kCPU, dtype);
#else
  if (cuda) {
    at::autocast::set_enabled(enabled);
    at::autocast::set_autocast_gpu_dtype(dtype);
  } else {
    at::autocast::set_cpu_enabled(enabled);
    at::autocast::set_autocast_cpu_dtype(dtype);
  }
#endif
}

}  // namespace

Autocast::Autocast(bool bf16, const torch::Device& device) : on_(bf16), cuda_(device.is_cuda()) {
  if (!on_) return;
  was_enabled_ = autocast_enabled(cuda_);
  was_dtype_ = autocast_dtype(cuda_);
  set_autocast(cuda_, true, at::kBFloat16);
  at::autocast::increment_nesting();
}

Autocast::~Autocast() {
  if (!on_) return;
  // The casts of the weights are cached while autocast is on; free them with the scope.
  if (at::autocast::decrement_nesting() == 0) at::autocast::clear_cache();
  set_autocast(cuda_, was_enabled_, was_dtype_);
}

}  // namespace graft
