// Sums the gradients of a run's trainable tensors over its ranks: bucketed all-reduces started
// while the backward still runs (as PyTorch's DistributedDataParallel does), in the same order on
// every rank.
#pragma once

#include <graft/distributed.h>
#include <torch/types.h>

#include <cstdint>
#include <memory>
#include <vector>

namespace graft::dist {

class GradientReducer {
 public:
  /// Buckets of at most `bucket_bytes` (one tensor larger than that is a bucket of its own), in
  /// the reverse of `params`' order, which is roughly the order the backward produces them in.
  GradientReducer(ProcessGroup& group, std::vector<at::Tensor> params,
                  std::int64_t bucket_bytes = std::int64_t{25} << 20);
  ~GradientReducer();
  GradientReducer(const GradientReducer&) = delete;
  GradientReducer& operator=(const GradientReducer&) = delete;

  /// Before the step's first backward: empties the buckets and the tensors' gradients.
  void start_step();
  /// Before each backward of the step; `last`: the step's last, whose buckets are sent as soon
  /// as all their tensors have their gradients.
  void before_backward(bool last);
  /// After the step's last backward: sends the buckets left, waits for all, and gives each
  /// tensor the sum over the ranks as its gradient (none where no rank computed one, as autograd
  /// leaves it in one process).
  void finish_step();

  /// Seconds spent waiting for communication (what the backward did not hide), since built.
  double waiting_seconds() const { return waiting_; }
  std::size_t buckets() const { return buckets_.size(); }

 private:
  struct Bucket {
    at::Tensor flat;
    std::vector<std::size_t> members;  // indices into params_
    std::size_t pending = 0;           // members without a gradient in the last backward
    std::unique_ptr<ProcessGroup::Pending> work;
  };
  void on_gradient(std::size_t param, const at::Tensor& grad);
  void launch_ready();

  ProcessGroup& group_;
  std::vector<at::Tensor> params_;
  std::vector<at::Tensor> slots_;  // each tensor's place in its bucket
  std::vector<std::size_t> bucket_of_;
  std::vector<unsigned> hook_ids_;
  std::vector<float> had_;  // 1: a gradient arrived this step
  std::vector<Bucket> buckets_;
  std::size_t next_ = 0;  // the next bucket to send
  bool last_ = false;
  double waiting_ = 0;
};

}  // namespace graft::dist
