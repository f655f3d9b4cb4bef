// Running recipes: training with evaluation, checkpoints and exact resume, writing a run folder;
// and evaluating a model (with adapters) on a recipe's data.
//
// A run folder (output.dir) holds:
//   recipe.yaml      the resolved recipe (includes and overrides applied)
//   manifest.json    graft version, git commit, libtorch version, plugins, hardware, seed, command
//   metrics.jsonl    one JSON object per log or evaluation (deterministic: no timings)
//   summary.json     final metrics, eval before/after, samples, trainable parameters, timings
//   adapter/         the trained methods (graft adapter folder; task_head.safetensors when a
//                    classification head was trained)
//   checkpoints/step-N/  methods' training state, optimizer state, RNG state, data position
// Every file is written atomically. In a distributed run (RunOptions::launch) every rank trains
// its share of each batch and rank 0 alone writes the folder.
#pragma once

#include <graft/distributed.h>
#include <graft/recipe.h>

#include <chrono>
#include <cstdint>
#include <filesystem>
#include <functional>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

namespace graft {

struct RunOptions {
  bool resume = false;       ///< continue from the run folder's latest checkpoint
  bool overwrite = false;    ///< start again in a folder that holds a run (graft's files go)
  std::int64_t stop_at = 0;  ///< stop after this step with a checkpoint, as if interrupted
  bool progress = true;      ///< a progress bar on a terminal (plain lines otherwise)
  std::string command_line;  ///< recorded in the manifest
  /// Stop at the next step boundary with a checkpoint when the process gets SIGINT or SIGTERM
  /// (a second one ends it at once); the summary then holds "interrupted_at" and "signal".
  bool handle_signals = false;
  /// Called after every optimizer step with the step's number (progress for embedders).
  std::function<void(std::int64_t)> on_step;
  /// This process's place in a distributed run (launch_from_environment(); default: alone).
  /// Every rank runs the same recipe; rank 0 writes the run folder (docs/distributed.md).
  Launch launch;
  /// How long the ranks wait for each other to join.
  std::chrono::milliseconds rendezvous_timeout{std::chrono::minutes(5)};
};

/// Trains, evaluates and saves as the recipe says. Returns summary.json's content (or, stopped
/// early, {"stopped_at"} / {"interrupted_at", "signal"}). Errors: a ParamError/FileError for a
/// bad recipe, model or data (before any work starts); an Error when the loss stops being finite
/// (the last good checkpoint is kept and named), or when output.dir holds a run and neither
/// --resume nor --overwrite says what to do with it. A folder whose run stopped before its first
/// checkpoint holds no progress and is started again.
nlohmann::json run_recipe(const Recipe& recipe, const RunOptions& options);

/// Everything `run_recipe` checks before its first step, without training or writing: the model
/// (device, dtype, tokenizer), the methods attached in order, lengths against the model's
/// positions, and the data read and tokenized as training reads it. Returns the numbers of
/// training and eval examples; throws the error the run would stop with.
nlohmann::json validate_recipe(const Recipe& recipe);

/// The run folder's newest complete checkpoint (checkpoints/step-N holding trainer.json), or an
/// empty path when it has none.
std::filesystem::path latest_checkpoint(const std::filesystem::path& run);

/// Evaluates the recipe's model, with the given adapter folders loaded (none: the base model),
/// on the recipe's eval split. Returns {"metrics": {...}, "examples": n}.
nlohmann::json evaluate_recipe(const Recipe& recipe, const std::vector<std::string>& adapters);

}  // namespace graft
