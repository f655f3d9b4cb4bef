// The task head of classification recipes: pooling, reading, applying.
#include <graft/error.h>
#include <graft/io/safetensors.h>
#include <graft/task_head.h>
#include <torch/torch.h>

namespace graft {

at::Tensor pooled_for_classification(const Model& model, const ForwardOutput& out,
                                     const at::Tensor& attention_mask) {
  if (model.causal()) {
    // The last real token of each row: the largest position whose mask is 1.
    const auto T = attention_mask.size(1);
    auto positions = torch::arange(T, attention_mask.options().dtype(torch::kLong));
    auto last = (attention_mask.to(torch::kLong) * (positions + 1)).argmax(1);
    return out.hidden.index({torch::arange(out.hidden.size(0), last.options()), last});
  }
  return out.pooled.defined() ? out.pooled : out.hidden.select(1, 0);
}

at::Tensor TaskHeadWeights::logits(const at::Tensor& pooled) const {
  return torch::nn::functional::linear(pooled.to(weight.dtype()), weight, bias);
}

std::optional<TaskHeadWeights> read_task_head(const std::filesystem::path& adapter_dir,
                                              std::int64_t hidden) {
  const auto file = adapter_dir / kTaskHeadFile;
  if (!std::filesystem::exists(file)) return std::nullopt;
  auto t = io::read_safetensors(file.string()).tensors;
  auto w = t.find("linear.weight"), b = t.find("linear.bias");
  if (w == t.end() || b == t.end() || t.size() != 2)
    throw FileError(file.string(), "expected exactly linear.weight and linear.bias");
  if (w->second.dim() != 2 || w->second.size(1) != hidden || b->second.dim() != 1 ||
      b->second.size(0) != w->second.size(0))
    throw FileError(file.string(), "does not hold a head for a model of width " +
                                       std::to_string(hidden) + " (linear.weight is " +
                                       c10::str(w->second.sizes()) + ")");
  return TaskHeadWeights{w->second, b->second};
}

}  // namespace graft
