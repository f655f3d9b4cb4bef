// Loading models: from a GGUF file, a Hugging Face folder, or a name found on the model path.
#pragma once

#include <c10/core/Device.h>
#include <c10/core/ScalarType.h>
#include <graft/model.h>
#include <graft/tokenizer.h>

#include <filesystem>
#include <memory>
#include <string>
#include <vector>

namespace graft {

struct LoadOptions {
  std::string family;                   ///< when set, the file must be of this family
  c10::ScalarType dtype = c10::kFloat;  ///< parameter dtype after loading
  c10::Device device = c10::kCPU;
};

struct LoadedModel {
  std::shared_ptr<Model> model;          ///< in eval mode, parameters frozen (requires_grad off)
  std::shared_ptr<Tokenizer> tokenizer;  ///< null when the checkpoint carries none
  std::filesystem::path path;            ///< the file or folder it came from
  std::string format;                    ///< "gguf" or "hf"
  /// The Jinja chat template the checkpoint carries (tokenizer_config.json's chat_template, or
  /// its template named "default" when it holds several; GGUF tokenizer.chat_template); empty
  /// when it has none.
  std::string chat_template;
};

/// Folders searched for a model given by name, in order: each entry of $GRAFT_MODELS
/// (colon-separated), the shared models folder next to the source checkout (../shared/models),
/// the checkout's own models/ folder, and ./models.
std::vector<std::filesystem::path> model_search_path();

/// Resolves a model argument: an existing file or folder is used as it is; otherwise NAME is
/// looked up on the search path as NAME/ (a folder holding a .gguf file or config.json) or
/// NAME.gguf. Throws graft::Error naming every place it looked and how to provide the model.
std::filesystem::path resolve_model(const std::string& path_or_name);

/// Loads a model and its tokenizer. Throws graft::FileError for an unreadable or inconsistent
/// checkpoint (missing tensors, wrong shapes, unsupported architecture).
LoadedModel load_model(const std::string& path_or_name, const LoadOptions& options = {});

/// Writes `model` as a Hugging Face folder that graft (and transformers) load: config.json and
/// model.safetensors (sharded above 5 GiB), with the tokenizer files of `source` copied when it
/// is a Hugging Face folder, else the model's tokenizer converted (Tokenizer::hf_files) where it
/// has a Hugging Face form. `dir` must not exist or be empty; it is written completely or not
/// at all (built under a temporary name, then renamed). `dtype` (float, half or bfloat16)
/// converts every floating tensor; Undefined keeps the model's.
void save_hf_model(const Model& model, const std::filesystem::path& dir,
                   const std::filesystem::path& source = {},
                   c10::ScalarType dtype = c10::ScalarType::Undefined);

/// Writes a llama-family `model` as a GGUF file (F32/F16/BF16 tensors in the model's dtype),
/// with the architecture metadata from its configuration and the tokenizer and general.*
/// metadata copied from `source` when that is a GGUF file. `dtype` (float, half or bfloat16)
/// converts the matrices; vectors (norms, biases) stay float32, as llama.cpp's converter keeps
/// them. With `q8_0`, every matrix whose rows are a multiple of 32 long is written as Q8_0 (as
/// llama.cpp's `llama-quantize ... Q8_0` does); the others in `dtype`.
void save_gguf_model(const Model& model, const std::filesystem::path& file,
                     const std::filesystem::path& source = {},
                     c10::ScalarType dtype = c10::ScalarType::Undefined, bool q8_0 = false);

/// Builds a model of `config.family` with uninitialised weights (for tests, benchmarks and
/// training from scratch); init_random() then fills them reproducibly.
std::shared_ptr<Model> make_model(const ModelConfig& config);
/// Fills every parameter from `seed`: weights and biases N(0, std), norm gains 1 + N(0, std).
void init_random(Model& model, std::uint64_t seed, double std = 0.02);

/// The cores this process may run on (its CPU affinity, as `nproc` counts them; at least 1).
int available_cores();

/// libtorch's OpenMP threads spin after each parallel region unless the environment says
/// otherwise, taking the cores from whatever else runs (docs/performance.md). The OpenMP runtime
/// reads its environment when it loads, before `main`: so, unless OMP_WAIT_POLICY is set already,
/// this sets it to PASSIVE and executes the program again with the same arguments. Call it first
/// thing in `main`; it returns (doing nothing more) where the variable is set or the restart fails.
void wait_passively(char** argv);

/// Sets how many threads compute: `threads` when positive, else the machine's cores. They are
/// libtorch's intra-op pool; OpenBLAS, which libtorch calls from inside that work, then runs in
/// the calling thread, so that two pools never compete for the cores (measured in
/// docs/performance.md; OPENBLAS_NUM_THREADS, where set, is left to rule). More threads than
/// cores is an error.
void set_threads(int threads = 0);

}  // namespace graft
