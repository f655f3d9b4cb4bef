// AdapterHub's adapter folders (the `adapters` library's save_adapter / save_adapter_setup), for
// the plugins that read and write their methods in that format:
//
//   DIR/adapter_config.json   {"config": {...} | {"architecture": "union", "configs": [...]},
//                              "name": <adapter name>, "model_type", "hidden_size", "version"}
//   DIR/adapter.safetensors   tensors named by transformers module paths with the adapter's name
//                             inside:
//                             "bert.encoder.layer.3.output.adapters.<name>.adapter_up.weight"
//   DIR/head_config.json + model_head.safetensors   the model's own (static) head, optional
//   DIR/adapter_setup.json    instead of the above: a composition ({"type": "Stack", ...}) of the
//                             adapters in the sub-folders DIR/<name>/
//
// The core reads and writes the files and splits a union into its parts; each part goes to the
// plugin whose AdapterFormat (named kFormat) reads_part() it. Which tensors a part holds and what
// they compute is the plugin's business; the helpers below name the modules.
#pragma once

#include <graft/io/tensors.h>
#include <graft/method.h>
#include <graft/model.h>

#include <filesystem>
#include <functional>
#include <memory>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

namespace graft::adapterhub {

/// The name plugins register their AdapterHub formats under ("export-adapter --format adapters").
inline const std::string kFormat = "adapters";

/// Whether `dir` holds an AdapterHub adapter (adapter_config.json with a "config" object and an
/// AdapterHub "version") or an AdapterHub composition (adapter_setup.json).
bool is_adapter(const std::filesystem::path& dir);

/// Loads the adapter or composition in `dir` onto `model`: every part through its plugin, the
/// folders of a Stack in order (each one's hooks after the previous one's at shared sites); a
/// static head must equal the model's own (a trained one is refused). A file holding only
/// pickled weights, a configuration no loaded plugin reads, a composition other than Stack,
/// a flex head, and any tensor no part took are refused in one line naming the file.
std::vector<std::unique_ptr<Method>> load(const std::filesystem::path& dir, Model& model);

/// Writes `methods` as one AdapterHub adapter named `name` (a union when there are several).
void save(const std::filesystem::path& dir, const Model& model, const std::vector<Method*>& methods,
          const std::string& name);

/// The model's module path prefix of the base model ("bert.", "roberta.", "transformer.",
/// "model.", or "" for a bare BertModel).
std::string base_prefix(const ModelConfig& config);

/// Where a bottleneck adapter at a sublayer site (attn.out, ffn.out) lives, up to and without
/// ".adapters.<name>.": "bert.encoder.layer.3.attention.output", "transformer.h.3.output_adapters".
std::string bottleneck_location(const ModelConfig& config, const Site& site);

/// The self-attention module of a layer ("bert.encoder.layer.3.attention.self",
/// "model.layers.3.self_attn", "transformer.h.3.attn").
std::string attention_module(const ModelConfig& config, std::int64_t layer);

/// What a plugin's read_part ends with: attaches `method` to `model` (an error becomes a FileError
/// naming `source`), loads the state `state` gives for it once attached, and returns it as the
/// part's one method.
std::vector<std::unique_ptr<Method>> attach_part(
    std::unique_ptr<Method> method, Model& model, const std::string& source,
    const std::function<io::TensorMap(Method& attached)>& state);

/// The AdapterFormat (kFormat) a plugin registers for `method`'s parts; `reads` and `read` may
/// be empty for a method that is only written (its parts read as another method).
AdapterFormat part_format(const std::string& method,
                          std::function<bool(const nlohmann::json&)> reads,
                          decltype(AdapterFormat::read_part) read,
                          decltype(AdapterFormat::write_part) write);

/// Takes `key` out of `tensors`; a missing key is a FileError naming it and `source`.
at::Tensor take(io::TensorMap& tensors, const std::string& key, const std::string& source);

/// Checks one part's configuration: every key is one the reader handles (`handled`), one that
/// does not change what a loaded adapter computes (dropout, initialisation, names), or holds a
/// neutral value (null, false, 0, an empty list). Any other key is refused by name, with its
/// value and the file.
void check_part(const nlohmann::json& part, const std::string& source,
                const std::vector<std::string>& handled);

}  // namespace graft::adapterhub
