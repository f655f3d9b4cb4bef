// Adapter folders: the state and settings of one or more methods, saved apart from the base
// model and loadable onto it later.
//
//   DIR/adapter_config.json   {"format": "graft-adapter", "format_version": 1, "graft_version",
//                              "base_model": {family, architecture, widths...},
//                              "methods": [{"name": <method>, "plugin": {"name", "version"},
//                                           "config": {...}}, ...]}
//   DIR/adapter.safetensors   "<method index>.<tensor name>" for each method's state
#pragma once

#include <graft/method.h>
#include <graft/model.h>

#include <filesystem>
#include <memory>
#include <vector>

namespace graft {

/// Writes the methods' settings and state into `dir` (created if needed; files written
/// atomically).
void save_adapter(const std::filesystem::path& dir, const Model& model,
                  const std::vector<Method*>& methods);

/// Rebuilds the methods saved in `dir` through the plugin registry, attaches them to `model` and
/// loads their state. `dir` may also hold a foreign format a plugin reads (a Hugging Face peft
/// adapter). A base model that does not match the one the adapter was trained on (other
/// family, other widths, missing sites, other shapes) is an error naming the file, the mismatch
/// and the fix. A method whose plugin is not loaded is an error naming the plugin (and version)
/// the adapter recorded; a loaded plugin of another major version is refused.
std::vector<std::unique_ptr<Method>> load_adapter(const std::filesystem::path& dir, Model& model);

/// Writes an adapter's attached methods in a format: "graft", or a foreign one ("peft", "gguf")
/// registered by the plugins of the methods. One method of the format is written at `path`, the
/// other methods beside it where the format has a place for them (peft's modules_to_save);
/// several are written one sub-folder each (`path/<method>`, as peft saves several adapters),
/// the others beside the first. A method the format has no place for is an error naming the
/// methods the format holds (to export alone); a format none of the methods has is an error
/// listing the formats they have.
void save_adapter_as(const std::string& format, const std::filesystem::path& path,
                     const Model& model, const std::vector<Method*>& methods);

/// Combines the adapters at `sources` (each holding one method, all of the same method) into one
/// new method attached to `model`, through the combiner its plugin registers (MethodInfo::
/// combine). The sources are loaded for the call only. Errors name the source that cannot take
/// part, or the option the method does not offer.
std::unique_ptr<Method> combine_adapters(const std::vector<std::filesystem::path>& sources,
                                         const CombineOptions& options, Model& model);

/// Converts JSON (a method's saved config) into Params whose errors name `file` and `path`.
Params params_from_json(const nlohmann::json& j, const std::string& file, const std::string& path);

}  // namespace graft
