// Task data: plain-text corpora chunked into sequences, labelled records (TSV, CSV, JSONL, JSON)
// for classification, and prompt/response pairs for instruction tuning; tokenized, split into
// train and eval deterministically from the seed, and batched.
#pragma once

#include <ATen/core/Tensor.h>
#include <graft/chat.h>
#include <graft/recipe.h>
#include <graft/tokenizer.h>

#include <cstdint>
#include <string>
#include <vector>

namespace graft {

/// One training example. Language modelling: `labels` holds the target of each position (the
/// token itself; -100 where no loss is taken: instruction prompts). Classification: `label`.
struct Example {
  std::vector<std::int64_t> ids;
  std::vector<std::int64_t> labels;
  std::int64_t label = -1;
};

struct TaskData {
  std::vector<Example> train, eval;
  std::int64_t documents = 0;  ///< records or documents read
  std::int64_t dropped = 0;    ///< records dropped: no label (JSON null), the label rule, or
                               ///< (instruction) a prompt leaving no response
};

/// Reads, tokenizes and splits the task's data. A malformed record is a FileError naming the
/// file and line. An instruction task with a chat template (task.chat_template other than
/// "none") renders its records with `chat`, which must then be given.
TaskData load_task_data(const TaskSpec& task, const Tokenizer& tokenizer, std::uint64_t seed,
                        const ChatTemplate* chat = nullptr);

/// A padded batch: input_ids and attention_mask [B, T] (right padding), labels [B, T] for
/// language modelling (-100 on padding) or [B] for classification.
struct Batch {
  at::Tensor input_ids, attention_mask, labels;
  std::int64_t tokens = 0;  ///< real tokens in the batch
};
Batch make_batch(const std::vector<Example>& examples, const std::vector<std::size_t>& which,
                 std::int64_t pad_id, bool classification);

/// A deterministic permutation of 0..n-1 for `seed` and `epoch` (splitmix64 Fisher-Yates: the
/// same on every platform).
std::vector<std::size_t> shuffled(std::size_t n, std::uint64_t seed, std::uint64_t epoch);

/// Why a task of this kind drops records (for TaskData::dropped), in words.
std::string dropped_reason(const TaskSpec& task);

}  // namespace graft
