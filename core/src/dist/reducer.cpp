#include "dist/reducer.h"

#include <graft/error.h>
#include <torch/torch.h>

#include <chrono>
#include <map>
#include <tuple>

namespace graft::dist {

GradientReducer::GradientReducer(ProcessGroup& group, std::vector<at::Tensor> params,
                                 std::int64_t bucket_bytes)
    : group_(group), params_(std::move(params)) {
  const auto n = params_.size();
  slots_.resize(n);
  bucket_of_.resize(n);
  had_.assign(n, 0.0f);
  // Tensors of one dtype and device share a bucket; the backward's order is roughly the reverse
  // of the parameters' (the last layer's gradients come first).
  std::map<std::tuple<int, int, int>, std::size_t> open;  // dtype, device type, index -> bucket
  std::vector<std::int64_t> sizes;
  for (std::size_t k = n; k-- > 0;) {
    const auto& p = params_[k];
    const auto key = std::make_tuple(static_cast<int>(p.scalar_type()),
                                     static_cast<int>(p.device().type()), p.device().index());
    const auto bytes = p.numel() * static_cast<std::int64_t>(p.element_size());
    auto it = open.find(key);
    if (it == open.end() || (sizes[it->second] > 0 && sizes[it->second] + bytes > bucket_bytes)) {
      buckets_.emplace_back();
      sizes.push_back(0);
      it = open.insert_or_assign(key, buckets_.size() - 1).first;
    }
    buckets_[it->second].members.push_back(k);
    sizes[it->second] += bytes;
    bucket_of_[k] = it->second;
  }
  for (auto& b : buckets_) {
    std::int64_t numel = 0;
    for (auto k : b.members) numel += params_[k].numel();
    const auto& first = params_[b.members.front()];
    b.flat = torch::zeros({numel}, first.options().requires_grad(false));
    std::int64_t at = 0;
    for (auto k : b.members) {
      slots_[k] = b.flat.narrow(0, at, params_[k].numel()).view(params_[k].sizes());
      at += params_[k].numel();
    }
  }
  for (std::size_t k = 0; k < n; ++k)
    hook_ids_.push_back(
        params_[k].register_hook([this, k](at::Tensor grad) { on_gradient(k, grad); }));
}

GradientReducer::~GradientReducer() {
  for (std::size_t k = 0; k < hook_ids_.size(); ++k) params_[k].remove_hook(hook_ids_[k]);
}

void GradientReducer::start_step() {
  torch::NoGradGuard no_grad;
  for (auto& b : buckets_) {
    b.flat.zero_();
    b.work.reset();
  }
  for (auto& p : params_) p.mutable_grad() = at::Tensor();
  std::fill(had_.begin(), had_.end(), 0.0f);
  next_ = 0;
  last_ = false;
}

void GradientReducer::before_backward(bool last) {
  last_ = last;
  if (!last) return;
  for (auto& b : buckets_) b.pending = b.members.size();
}

void GradientReducer::on_gradient(std::size_t k, const at::Tensor& grad) {
  torch::NoGradGuard no_grad;
  slots_[k].add_(grad);
  had_[k] = 1.0f;
  if (!last_) return;
  auto& b = buckets_[bucket_of_[k]];
  if (b.pending > 0 && --b.pending == 0) launch_ready();
}

void GradientReducer::launch_ready() {
  // In bucket order on every rank, whatever order the gradients arrived in: collectives pair up
  // by the order they are started.
  while (next_ < buckets_.size() && buckets_[next_].pending == 0) {
    buckets_[next_].work = group_.allreduce_sum_async(buckets_[next_].flat);
    ++next_;
  }
}

void GradientReducer::finish_step() {
  for (; next_ < buckets_.size(); ++next_)
    buckets_[next_].work = group_.allreduce_sum_async(buckets_[next_].flat);
  // Whether any rank computed each tensor's gradient: one that none did keeps none, so that the
  // optimizer skips it as it would in one process.
  auto had = torch::tensor(had_, torch::kFloat);
  if (!params_.empty()) had = had.to(params_.front().device());
  auto had_work = group_.allreduce_sum_async(had);
  const auto start = std::chrono::steady_clock::now();
  for (auto& b : buckets_) b.work->wait();
  had_work->wait();
  waiting_ += std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  const auto any = had.cpu();
  const auto* a = any.data_ptr<float>();
  for (std::size_t k = 0; k < params_.size(); ++k)
    params_[k].mutable_grad() = a[k] > 0 ? slots_[k] : at::Tensor();
}

}  // namespace graft::dist
