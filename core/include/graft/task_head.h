// The classifier a classification recipe trains when the model has no classification head of the
// task's width (a causal LM classifying by its last token): one linear layer on the pooled hidden
// state, saved as task_head.safetensors beside the adapter.
#pragma once

#include <ATen/ATen.h>
#include <graft/model.h>

#include <filesystem>
#include <optional>

namespace graft {

/// The task head's file name inside an adapter folder.
inline constexpr const char* kTaskHeadFile = "task_head.safetensors";

/// What a classifier reads from a forward: for causal models the hidden state of each row's last
/// real token (by `attention_mask`, left or right padding), else the pooled output where the
/// model has one (bert's pooler), else the first token's hidden state.
at::Tensor pooled_for_classification(const Model& model, const ForwardOutput& out,
                                     const at::Tensor& attention_mask);

/// A task head's weights: `weight` [labels, hidden] and `bias` [labels].
struct TaskHeadWeights {
  at::Tensor weight, bias;
  std::int64_t labels() const { return weight.size(0); }
  /// The class logits [batch, labels] of a forward's pooled state.
  at::Tensor logits(const at::Tensor& pooled) const;
};

/// The task head saved in `adapter_dir`, if there is one; throws graft::FileError when the file
/// is not a head for a model of `hidden` width.
std::optional<TaskHeadWeights> read_task_head(const std::filesystem::path& adapter_dir,
                                              std::int64_t hidden);

}  // namespace graft
