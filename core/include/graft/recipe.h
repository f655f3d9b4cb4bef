// Recipes: a YAML file saying model, task and data, methods, training, evaluation and output.
// Loading resolves `include:` files and command-line overrides ("train.lr=3e-4",
// "methods[0].r=16") into one settings tree whose every node knows its file, line and column;
// Recipe::from_params() then validates every key before any work starts.
#pragma once

#include <graft/params.h>

#include <cstdint>
#include <filesystem>
#include <optional>
#include <string>
#include <vector>

namespace graft {

/// Reads a YAML file into settings (scalars keep their text; sources are file:line:column).
/// A syntax error is a FileError naming the file, line and column.
Params read_yaml(const std::filesystem::path& path);
/// The same for YAML text; `name` stands for the file in sources and errors.
Params read_yaml_text(const std::string& text, const std::string& name);

/// The folder holding the shipped recipes/ and configs/: the source checkout graft was built
/// from, else where `cmake --install` put them (share/graft). Throws graft::Error when neither has
/// them.
std::filesystem::path shipped_recipes_root();

/// Writes settings back as YAML (block style, keys in their order).
std::string to_yaml(const Params& params);

/// Writes settings as one line of flow-style YAML ("{name: m, rank: 8}"), the form a
/// command-line override takes.
std::string to_flow_yaml(const Params& params);

/// Reads a recipe with its includes (`include: base.yaml` or a list, relative to the including
/// file; the including file's keys win, maps merge, lists and scalars replace) and applies
/// overrides "key.path=value" in order (a value is read as YAML: "[attn.q, attn.v]" is a list).
Params load_recipe(const std::filesystem::path& path,
                   const std::vector<std::string>& overrides = {});

struct ModelSpec {
  std::string path;               ///< a file, folder or name on the model path
  std::string family;             ///< "" or a family the model must have
  std::string dtype = "float32";  ///< float32, bfloat16, float16
  std::string device = "cpu";     ///< cpu, cuda, cuda:N
  /// Adapters loaded onto the model before the recipe's methods and kept frozen (any format
  /// graft reads): the methods train on top of them, as on AdapterHub's Stack. The run's own
  /// adapter holds only the recipe's methods. Entries are PATH or NAME=PATH, as --adapter's.
  std::vector<std::filesystem::path> adapters;
  std::vector<std::string> adapter_names;  ///< one per adapter (its folder's name by default)
  /// model.active: the names of the adapters that apply (in that order); unset: every one.
  std::optional<std::vector<std::string>> active;
};

struct TaskSpec {
  std::string kind = "causal_lm";  ///< causal_lm, sequence_classification, instruction
  std::vector<std::filesystem::path> train, eval;  ///< resolved files (globs expanded)
  double eval_fraction = 0.1;        ///< held out from train when no eval files are given
  std::string format = "text";       ///< text, tsv, csv, jsonl, json
  std::vector<std::string> columns;  ///< tsv/csv column names when the file has no header
  std::string text_field = "text", label_field = "label";
  std::string prompt_field = "prompt", response_field = "response";
  /// instruction: how prompt and response are joined. "none": as token ids, nothing between;
  /// "chat": the model's chat template; or a chat format by name (chatml, llama2, llama3).
  std::string chat_template = "none";
  std::string system;  ///< chat templates: a system message put before every prompt (or none)
  std::string label_rule = "none";  ///< none, sign (>0 -> 1, <0 -> 0, 0 dropped)
  std::int64_t num_labels = 2;
  std::int64_t max_length = 128;
  bool packing = true;             ///< causal_lm: concatenate documents, then cut into sequences
  std::int64_t max_documents = 0;  ///< 0 = all
};

struct TrainSpec {
  std::int64_t steps = 0;   ///< optimizer steps; 0 = from epochs
  std::int64_t epochs = 1;  ///< used when steps is 0
  std::int64_t batch_size = 8;
  std::int64_t gradient_accumulation = 1;
  std::string optimizer = "adamw";  ///< adamw, sgd
  double lr = 1e-3, weight_decay = 0.0, momentum = 0.0;
  double beta1 = 0.9, beta2 = 0.999, eps = 1e-8;
  std::string schedule = "constant";  ///< constant, linear, cosine
  std::int64_t warmup_steps = 0;
  double max_grad_norm = 1.0;  ///< 0 = no clipping
  std::int64_t log_every = 10;
  /// float32, or bf16: forward and loss under bfloat16 autocast, float32 master weights
  std::string precision = "float32";
};

struct EvalSpec {
  std::int64_t every = 0;            ///< evaluate every N steps (0: before and after training only)
  std::int64_t batches = 0;          ///< 0 = the whole eval split
  std::vector<std::string> metrics;  ///< loss, perplexity, accuracy, f1
};

struct GenerateSpec {
  std::string prompt;  ///< empty: no sample generations
  std::int64_t max_new_tokens = 48;
};

struct OutputSpec {
  std::filesystem::path dir;
  bool save_adapter = true;
};

struct CheckpointSpec {
  std::int64_t every = 0;  ///< 0: only the final state
  std::int64_t keep = 2;
};

struct Recipe {
  std::filesystem::path file;  ///< the recipe file
  Params params;               ///< the resolved settings
  std::uint64_t seed = 0;
  ModelSpec model;
  TaskSpec task;
  Params methods;  ///< the list of method settings, each with `name`
  TrainSpec train;
  EvalSpec eval;
  GenerateSpec generate;
  OutputSpec output;
  CheckpointSpec checkpoint;

  /// Validates every key (unknown keys with did-you-mean, types, ranges, files that must exist,
  /// method names known to the loaded plugins); each problem is one ParamError with
  /// file:line:column.
  static Recipe from_params(const Params& params, const std::filesystem::path& file);
};

}  // namespace graft
