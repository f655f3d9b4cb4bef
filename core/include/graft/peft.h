// Hugging Face peft's adapter folders, for plugins that read and write their method in peft's
// format: adapter_config.json (with "peft_type") and adapter_model.safetensors whose tensors are
// named "base_model.model.<module>.<name>", <module> being the transformers module path of a
// site (model.layers.3.self_attn.q_proj, transformer.h.3.attn.c_attn,
// bert.encoder.layer.3.attention.self.query, ...). The core knows the module paths of its
// families; which tensors a method stores is the plugin's business.
#pragma once

#include <graft/io/tensors.h>
#include <graft/model.h>

#include <cstdint>
#include <filesystem>
#include <map>
#include <nlohmann/json.hpp>
#include <set>
#include <string>
#include <vector>

namespace graft::peft {

/// The prefix peft puts before every module path.
inline const std::string kPrefix = "base_model.model.";

/// Where a linear site lives in transformers' module tree, and which rows of that module's output
/// it is: GPT-2's fused c_attn holds q, k and v as thirds.
struct Module {
  std::string path;                 ///< without kPrefix
  std::int64_t row0 = 0, rows = 0;  ///< rows == 0: the whole output
};
Module module_of(const ModelConfig& config, const Site& site);

/// Every linear site of `model` by its peft module path (several for GPT-2's fused c_attn).
using ModuleIndex = std::map<std::string, std::vector<std::pair<Site, Module>>>;
ModuleIndex index_modules(const Model& model);

/// For a tensor name "base_model.model.<module><suffix>", the module path; "" when the name does
/// not end with `suffix`.
std::string module_of_tensor(const std::string& name, const std::string& suffix);

/// The value that the pattern map `key` (rank_pattern, alpha_pattern) of adapter_config.json
/// `config` gives a module path: the first entry that is the path or a dot-separated suffix of
/// it; nullptr when none is (or the map is absent).
const nlohmann::json* pattern_value(const nlohmann::json& config, const std::string& key,
                                    const std::string& module);

/// The module's last name component ("q_proj"), as peft's target_modules lists it.
std::string short_name(const std::string& module);

/// target_modules for a writer: the adapted `modules` (peft paths), each by its short name
/// ("q_proj") where that name selects no module outside the set, else by its full path, so that
/// peft wraps exactly these modules.
std::vector<std::string> target_modules(const Model& model, const std::set<std::string>& modules);

/// The modules that adapter_config.json's target_modules (a list: the name or a dotted suffix; a
/// string: a regular expression matched whole, or "all-linear"), layers_to_transform and
/// exclude_modules select among the model's linear modules, as peft selects them. An adapter's
/// tensors must cover exactly these: `present` (the modules with tensors of `tensor` in the
/// file) is compared, and a module missing or extra is an error naming it, the tensor and
/// `source`. Nothing is checked when the file has no target_modules (peft's per-model default).
void check_targets(const nlohmann::json& config, const Model& model,
                   const std::set<std::string>& present, const std::string& tensor,
                   const std::string& source);

/// peft's task type for a model: "SEQ_CLS" for classifiers, "CAUSAL_LM" otherwise.
std::string task_type(const ModelConfig& config);

/// Whether `dir` holds a peft adapter whose adapter_config.json has this "peft_type".
bool is_adapter(const std::filesystem::path& dir, const std::string& peft_type);

/// adapter_config.json of `dir`; malformed JSON is a FileError naming the file.
nlohmann::json read_config(const std::filesystem::path& dir);
/// adapter_model.safetensors of `dir`.
io::TensorMap read_tensors(const std::filesystem::path& dir);
/// The path read_tensors() reads, for error messages.
std::string tensors_path(const std::filesystem::path& dir);

/// Writes both files into `dir` (created if needed), each atomically.
void write_adapter(const std::filesystem::path& dir, const nlohmann::json& config,
                   const io::TensorMap& tensors);

/// Checks adapter_config.json: every key is one the reader handles (`handled`), one that does not
/// change what a loaded adapter computes (names and paths, initialisation, dropout, the target
/// lists that the tensors themselves answer), or holds a neutral value (null, false, an empty
/// list or object). Any other key changes the computation in a way graft does not implement: an
/// error naming the key, its value and the file.
void check_config(const nlohmann::json& config, const std::string& source,
                  const std::vector<std::string>& handled);

/// The tensors peft saves beside a method's own: copies of whole modules (modules_to_save, named
/// "base_model.model.classifier.weight", or "base_model.classifier.weight" by the prompt-learning
/// methods) and trained biases (bias "all" or "lora_only", "<module>.base_layer.bias" on the
/// layers a method wraps). Given the tensors a method's reader did not take, returns them as the
/// model's parameters (graft names, graft layouts); a tensor that is no parameter of this model
/// is an error naming it and `source`.
io::TensorMap base_parameters(const io::TensorMap& rest, const Model& model,
                              const std::string& source);

/// The other direction, for writers: whole base parameters a method trains in place (graft names)
/// as peft stores them. Every parameter of a module (weight and bias) makes the module one of
/// modules_to_save; biases alone are bias "all" when they are every bias of the model, or
/// "lora_only" when they are exactly those of `wrapped` (the peft module paths the method
/// adapts). Anything else has no place in peft's format: an error saying so.
struct SavedModules {
  io::TensorMap tensors;                     ///< peft tensor names
  std::vector<std::string> modules_to_save;  ///< module paths, as peft matches them
  std::string bias = "none";                 ///< "none", "all" or "lora_only"
};
SavedModules saved_modules(const io::TensorMap& parameters, const Model& model,
                           const std::vector<std::string>& wrapped, bool prompt_learning);

}  // namespace graft::peft
