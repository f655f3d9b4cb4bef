#include <graft/adapter.h>
#include <graft/adapterhub.h>
#include <graft/io/file.h>
#include <graft/io/json.h>
#include <graft/io/safetensors.h>
#include <graft/peft.h>
#include <graft/plugin.h>
#include <graft/version.h>

#include <algorithm>
#include <map>
#include <nlohmann/json.hpp>
#include <optional>
#include <regex>
#include <set>

#include "models/families.h"
#include "util/file.h"

namespace graft {
namespace fs = std::filesystem;
using nlohmann::json;

namespace {

const char* rope_style_name(RopeStyle s) {
  return s == RopeStyle::interleaved ? "interleaved" : "half_split";
}

// The base model as an adapter records it. q_k_row_order: how the rows of q and k (and of
// anything a method keeps per output row of them) pair up for rotary embeddings; graft runs
// every checkpoint it loads in transformers' half-split order, whatever the file's order.
json base_description(const ModelConfig& c) {
  json j = {{"family", c.family},
            {"architecture", c.architecture},
            {"vocab_size", c.vocab_size},
            {"hidden_size", c.hidden_size},
            {"num_layers", c.num_layers},
            {"num_heads", c.num_heads},
            {"num_kv_heads", c.num_kv_heads},
            {"intermediate_size", c.intermediate_size}};
  if (c.family == "llama") j["q_k_row_order"] = rope_style_name(c.rope_style);
  return j;
}

constexpr int kFormatVersion = 2;

bool is_graft_adapter(const fs::path& dir) {
  const auto cfg_path = dir / "adapter_config.json";
  if (!fs::exists(cfg_path)) return false;
  try {
    return io::read_json_file(cfg_path).value("format", "") == "graft-adapter";
  } catch (const std::exception&) {
    return false;
  }
}

// The loaded plugin that registered `method`; nullptr for a method registered in-process.
const PluginRecord* plugin_of(const std::string& method) {
  for (const auto& r : registered_methods())
    if (r.info.name == method && !r.file.empty())
      for (const auto& rec : load_plugins())
        if (rec.file == r.file) return &rec;
  return nullptr;
}

// The major part of a version "MAJOR.MINOR.PATCH".
std::string major_of(const std::string& version) { return version.substr(0, version.find('.')); }

// A method saved with the plugin that provided it ({"name", "version"}) needs that plugin: when
// no loaded plugin registers the method, the error names the plugin to install; a plugin of
// another major version is refused (its state may mean something else).
void check_plugin(const json& entry, const std::string& path, const std::string& where) {
  const auto plugin = entry.value("plugin", json());
  if (!plugin.is_object()) return;  // format 1 and 2 adapters before graft recorded it
  const auto name = entry.value("name", ""), wanted = plugin.value("name", "?"),
             version = plugin.value("version", "?");
  const auto registered = registered_methods();
  if (std::any_of(registered.begin(), registered.end(),
                  [&](const RegisteredMethod& r) { return r.info.name == name; })) {
    const auto* rec = plugin_of(name);
    if (rec && major_of(rec->version) != major_of(version))
      throw FileError(where, path + ": method \"" + name + "\" was saved by plugin " + wanted +
                                 " " + version + ", but the loaded plugin " + rec->name + " is " +
                                 rec->version + " (" + rec->file.string() +
                                 "); load the adapter with a plugin of version " +
                                 major_of(version) + ".x");
    return;
  }
  throw FileError(where, path + ": method \"" + name + "\" needs the plugin " + wanted + " " +
                             version +
                             ", which is not among the loaded plugins ('graft methods' "
                             "lists them); install it, or add its folder with --plugin-dir or "
                             "GRAFT_PLUGIN_PATH");
}

}  // namespace

void save_adapter_as(const std::string& format, const fs::path& path, const Model& model,
                     const std::vector<Method*>& methods) {
  if (format == "graft") {
    save_adapter(path, model, methods);
    return;
  }
  // AdapterHub keeps every method of an adapter in one configuration (a union), named after
  // the folder as its save_adapter names it after the adapter.
  if (format == adapterhub::kFormat) {
    const auto name = path.filename().string();
    adapterhub::save(path, model, methods, name.empty() || name == "." ? "adapter" : name);
    return;
  }
  // The methods with a writer for the format, each with it; the others go beside the first
  // (peft keeps whole modules and biases beside a method), if its writer has a place for them.
  std::set<std::string> known = {"graft"};
  std::vector<std::pair<Method*, AdapterFormat>> writers;
  std::vector<Method*> others;
  std::string names;
  for (auto* method : methods) {
    names += (names.empty() ? "" : " + ") + method->name();
    bool found = false;
    for (const auto& f : adapter_formats()) {
      if (f.method != method->name() || !f.write) continue;
      known.insert(f.name);
      if (f.name == format && !found) {
        writers.emplace_back(method, f);
        found = true;
      }
    }
    if (!found) others.push_back(method);
  }
  if (writers.empty()) {
    std::string list;
    for (const auto& k : known) list += (list.empty() ? "" : ", ") + k;
    throw Error(names + ": cannot write the \"" + format + "\" adapter format (formats: " + list +
                ")");
  }
  const auto one_by_one = [&](const std::string& why) {
    std::string held;
    for (const auto& [m, f] : writers) held += (held.empty() ? "" : ", ") + m->name();
    return Error(why + "; the \"" + format + "\" format holds " + held +
                 ": export those alone with --method");
  };
  // Several methods of the format: one folder each, named by the method, as peft saves several
  // adapters of one model. A failure part-way leaves no partial export.
  std::optional<io::MadeFolder> parent;
  if (writers.size() > 1 && !path.has_extension()) parent.emplace(path);
  std::map<std::string, int> seen;
  for (std::size_t i = 0; i < writers.size(); ++i) {
    auto [method, f] = writers[i];
    std::vector<Method*> group = {method};
    if (i == 0) group.insert(group.end(), others.begin(), others.end());
    auto where = path;
    if (writers.size() > 1) {
      if (path.has_extension())
        throw one_by_one(path.string() + ": " + std::to_string(writers.size()) + " methods (" +
                         names + ") need a folder, one sub-folder each");
      const int n = seen[method->name()]++;
      where = path / (method->name() + (n ? "-" + std::to_string(n + 1) : ""));
    }
    try {
      f.write(group, model, where);
    } catch (const SystemError&) {
      throw;
    } catch (const Error& e) {
      if (others.empty() || i > 0) throw;
      throw one_by_one(e.what());
    }
  }
  if (parent) parent->keep();
}

Params params_from_json(const json& j, const std::string& file, const std::string& path) {
  Source src{file, 0, 0};
  if (j.is_object()) {
    auto p = Params::map(path, src);
    for (const auto& [k, v] : j.items())
      p.set(k, params_from_json(v, file, path.empty() ? k : path + "." + k));
    return p;
  }
  if (j.is_array()) {
    auto p = Params::list(path, src);
    for (std::size_t i = 0; i < j.size(); ++i)
      p.add(params_from_json(j[i], file, path + "[" + std::to_string(i) + "]"));
    return p;
  }
  if (j.is_null()) return Params();
  if (j.is_string()) return Params::scalar(j.get<std::string>(), path, src);
  return Params::scalar(j.dump(), path, src);
}

void save_adapter(const fs::path& dir, const Model& model, const std::vector<Method*>& methods) {
  io::MadeFolder folder(dir);  // gone again if writing fails
  json cfg = {{"format", "graft-adapter"},
              {"format_version", kFormatVersion},
              {"graft_version", GRAFT_VERSION},
              {"base_model", base_description(model.config())},
              {"methods", json::array()}};
  io::TensorMap tensors;
  for (std::size_t i = 0; i < methods.size(); ++i) {
    // The plugin that provides the method, so that a graft without it can say which it needs.
    json plugin;
    if (const auto* rec = plugin_of(methods[i]->name()))
      plugin = {{"name", rec->name}, {"version", rec->version}};
    cfg["methods"].push_back(
        {{"name", methods[i]->name()}, {"plugin", plugin}, {"config", methods[i]->config()}});
    for (const auto& [key, t] : methods[i]->state())
      tensors[std::to_string(i) + "." + key] = t.detach();
  }
  io::write_safetensors(dir / "adapter.safetensors", tensors, {{"format", "graft-adapter"}});
  io::write_atomically(dir / "adapter_config.json",
                       [&](std::ostream& out) { out << cfg.dump(2) << "\n"; });
  folder.keep();
}

std::vector<std::unique_ptr<Method>> load_adapter(const fs::path& dir, Model& model) {
  const auto cfg_path = dir / "adapter_config.json";
  const std::string where = cfg_path.string();
  if (!is_graft_adapter(dir)) {
    if (adapterhub::is_adapter(dir)) return adapterhub::load(dir, model);
    for (const auto& f : adapter_formats())
      if (f.read && f.detect && f.detect(dir)) return f.read(dir, model);
  }
  if (!fs::exists(cfg_path))
    throw FileError(dir.string(),
                    "not an adapter folder (no adapter_config.json) and no plugin reads it");
  const json cfg = io::read_json_file(cfg_path);
  if (cfg.value("format", "") != "graft-adapter")
    throw FileError(where,
                    "neither a graft adapter nor a format a loaded plugin reads (for a peft "
                    "adapter: is the plugin of its method on the plugin path?)");
  const auto version = cfg.value("format_version", 0);
  if (version != 1 && version != kFormatVersion)
    throw FileError(where, "adapter format_version " + cfg.value("format_version", json()).dump() +
                               " is not supported (this graft reads versions 1 and 2)");
  const auto expected = base_description(model.config());
  const auto& base = cfg.value("base_model", json::object());
  // Version 1 did not record the q/k row order, and graft then ran GGUF llamas in llama.cpp's
  // interleaved order: such an adapter cannot be placed on a rotary model without guessing.
  if (version == 1 && expected.contains("q_k_row_order"))
    throw FileError(where, "adapter format 1 (graft " +
                               cfg.value("graft_version", std::string("?")) +
                               ") does not record the q/k row order of its base, which this graft "
                               "needs for a rotary model; train the adapter again with this graft");
  for (const auto& [key, value] : expected.items()) {
    if (key == "architecture") continue;  // a classifier and an LM of one base share adapters
    if (base.contains(key) && base[key] != value)
      throw FileError(where, "the adapter was trained on a base model with " + key + " " +
                                 base[key].dump() + ", but this model has " + value.dump() +
                                 "; load it onto the model it was trained on");
  }
  const auto tensors = io::read_safetensors(dir / "adapter.safetensors").tensors;
  std::vector<std::unique_ptr<Method>> out;
  const auto& list = cfg.value("methods", json::array());
  for (std::size_t i = 0; i < list.size(); ++i) {
    const auto name = list[i].value("name", "");
    check_plugin(list[i], "methods[" + std::to_string(i) + "]", where);
    const std::string path = "methods[" + std::to_string(i) + "].config";
    auto params = params_from_json(list[i].value("config", json::object()), where, path);
    auto method = make_method(name, params);
    try {
      method->attach(model);
    } catch (const Error& e) {
      throw FileError(where, std::string("cannot attach to this model: ") + e.what());
    }
    io::TensorMap mine;
    const std::string prefix = std::to_string(i) + ".";
    for (const auto& [key, t] : tensors)
      if (key.rfind(prefix, 0) == 0) mine[key.substr(prefix.size())] = t;
    method->load_state(mine, (dir / "adapter.safetensors").string());
    out.push_back(std::move(method));
  }
  return out;
}

}  // namespace graft

namespace graft::peft {

Module module_of(const ModelConfig& c, const Site& site) {
  const std::string L = std::to_string(site.layer);
  const auto& p = site.point;
  if (c.family == "llama") {
    if (p == "head") return {"lm_head"};
    static const std::map<std::string, std::string> m = {
        {"attn.q", "self_attn.q_proj"}, {"attn.k", "self_attn.k_proj"},
        {"attn.v", "self_attn.v_proj"}, {"attn.o", "self_attn.o_proj"},
        {"ffn.gate", "mlp.gate_proj"},  {"ffn.up", "mlp.up_proj"},
        {"ffn.down", "mlp.down_proj"}};
    return {"model.layers." + L + "." + m.at(p)};
  }
  if (c.family == "gpt2") {
    if (p == "head") return {"lm_head"};
    const std::string h = "transformer.h." + L + ".";
    const auto d = c.hidden_size;
    if (p == "attn.q") return {h + "attn.c_attn", 0, d};
    if (p == "attn.k") return {h + "attn.c_attn", d, d};
    if (p == "attn.v") return {h + "attn.c_attn", 2 * d, d};
    if (p == "attn.o") return {h + "attn.c_proj"};
    if (p == "ffn.up") return {h + "mlp.c_fc"};
    return {h + "mlp.c_proj"};
  }
  // bert: the task models put the encoder under bert. or roberta.
  const std::string base = c.classifier.empty() ? "" : (c.roberta_positions ? "roberta." : "bert.");
  if (p == "head") return {c.classifier == "roberta" ? "classifier.out_proj" : "classifier"};
  static const std::map<std::string, std::string> m = {
      {"attn.q", "attention.self.query"}, {"attn.k", "attention.self.key"},
      {"attn.v", "attention.self.value"}, {"attn.o", "attention.output.dense"},
      {"ffn.up", "intermediate.dense"},   {"ffn.down", "output.dense"}};
  return {base + "encoder.layer." + L + "." + m.at(p)};
}

namespace {
// peft's name matching: `name` is the module path itself or a dot-separated suffix of it.
bool names_module(const std::string& name, const std::string& module) {
  return module == name || (module.size() > name.size() &&
                            module.compare(module.size() - name.size(), name.size(), name) == 0 &&
                            module[module.size() - name.size() - 1] == '.');
}
}  // namespace

const nlohmann::json* pattern_value(const nlohmann::json& config, const std::string& map,
                                    const std::string& module) {
  // peft matches the keys as regular expressions anchored at the end of the module path after a
  // dot; graft takes keys that are plain paths or path suffixes.
  if (!config.contains(map) || !config[map].is_object()) return nullptr;
  const auto& patterns = config[map];
  for (auto it = patterns.begin(); it != patterns.end(); ++it)
    if (names_module(it.key(), module)) return &*it;
  return nullptr;
}

std::string short_name(const std::string& module) { return module.substr(module.rfind('.') + 1); }

ModuleIndex index_modules(const Model& model) {
  ModuleIndex out;
  for (const auto& s : model.sites())
    if (Model::is_linear_point(s.point)) {
      auto m = module_of(model.config(), s);
      out[m.path].emplace_back(s, m);
    }
  return out;
}

std::string module_of_tensor(const std::string& name, const std::string& suffix) {
  if (name.size() <= suffix.size() ||
      name.compare(name.size() - suffix.size(), suffix.size(), suffix) != 0)
    return {};
  auto module = name.substr(0, name.size() - suffix.size());
  if (module.rfind(kPrefix, 0) == 0) module = module.substr(kPrefix.size());
  return module;
}

std::vector<std::string> target_modules(const Model& model, const std::set<std::string>& modules) {
  const auto all = index_modules(model);
  std::set<std::string> out;
  for (const auto& m : modules) {
    const auto name = short_name(m);
    bool exact = true;
    for (const auto& [other, sites] : all)
      exact &= short_name(other) != name || modules.count(other) > 0;
    out.insert(exact ? name : m);
  }
  return {out.begin(), out.end()};
}

void check_targets(const nlohmann::json& config, const Model& model,
                   const std::set<std::string>& present, const std::string& tensor,
                   const std::string& source) {
  const auto targets = config.value("target_modules", nlohmann::json());
  if (targets.is_null()) return;
  // A list matches a module by its path or a dotted suffix; a string is a regular expression
  // matched against the whole path ("all-linear": every linear module but the output layer).
  auto matches = [&](const nlohmann::json& spec, const std::string& module, const Site& site) {
    if (spec.is_string()) {
      const auto pattern = spec.get<std::string>();
      if (pattern == "all-linear") return site.point != "head";
      try {
        return std::regex_match(module, std::regex(pattern));
      } catch (const std::regex_error&) {
        throw FileError(source, "target_modules \"" + pattern +
                                    "\" is not a regular expression graft can read");
      }
    }
    if (!spec.is_array()) return false;
    for (const auto& t : spec)
      if (t.is_string() && names_module(t.get<std::string>(), module)) return true;
    return false;
  };
  std::set<std::int64_t> layers;
  const auto ltt = config.value("layers_to_transform", nlohmann::json());
  if (ltt.is_number_integer()) layers.insert(ltt.get<std::int64_t>());
  if (ltt.is_array())
    for (const auto& l : ltt)
      if (l.is_number_integer()) layers.insert(l.get<std::int64_t>());
  const auto exclude = config.value("exclude_modules", nlohmann::json());
  std::set<std::string> expected;
  for (const auto& [module, sites] : index_modules(model)) {
    const auto& site = sites.front().first;
    if (!matches(targets, module, site)) continue;
    if (!layers.empty() && !layers.count(site.layer)) continue;
    if (!exclude.is_null() && matches(exclude, module, site)) continue;
    expected.insert(module);
  }
  for (const auto& m : expected)
    if (!present.count(m))
      throw FileError(source, "lacks '" + std::string(kPrefix) + m + tensor + "': target_modules " +
                                  targets.dump() + " names module " + m +
                                  " (a damaged or incomplete file?)");
  for (const auto& m : present)
    if (!expected.count(m))
      throw FileError(source, "holds '" + std::string(kPrefix) + m + tensor +
                                  "', but target_modules " + targets.dump() +
                                  " does not name module " + m);
}

std::string task_type(const ModelConfig& c) { return c.num_labels > 0 ? "SEQ_CLS" : "CAUSAL_LM"; }

nlohmann::json read_config(const fs::path& dir) {
  const auto path = dir / "adapter_config.json";
  return io::read_json_file(path);
}

std::string tensors_path(const fs::path& dir) {
  return (dir / "adapter_model.safetensors").string();
}

io::TensorMap read_tensors(const fs::path& dir) {
  return io::read_safetensors(tensors_path(dir)).tensors;
}

bool is_adapter(const fs::path& dir, const std::string& peft_type) {
  if (!fs::exists(dir / "adapter_config.json") || !fs::exists(dir / "adapter_model.safetensors"))
    return false;
  try {
    return read_config(dir).value("peft_type", "") == peft_type;
  } catch (const Error&) {
    return false;
  }
}

void check_config(const nlohmann::json& cfg, const std::string& source,
                  const std::vector<std::string>& handled) {
  // Keys that say where an adapter came from or how it was initialised and trained, and target
  // lists that the saved tensors answer by themselves.
  static const std::set<std::string> descriptive = {"peft_type",
                                                    "task_type",
                                                    "base_model_name_or_path",
                                                    "revision",
                                                    "inference_mode",
                                                    "auto_mapping",
                                                    "target_modules",
                                                    "exclude_modules",
                                                    "layers_to_transform",
                                                    "layers_pattern",
                                                    "modules_to_save",
                                                    "bias",
                                                    "init_lora_weights",
                                                    "init_ia3_weights",
                                                    "init_weights",
                                                    "lora_dropout",
                                                    "module_dropout",
                                                    "rank_dropout",
                                                    "rank_dropout_scale",
                                                    "megatron_core",
                                                    "eva_config",
                                                    "fan_in_fan_out",
                                                    "tokenizer_name_or_path",
                                                    "tokenizer_kwargs",
                                                    "prompt_tuning_init",
                                                    "prompt_tuning_init_text",
                                                    "runtime_config"};
  if (!cfg.is_object()) throw FileError(source, "expected a JSON object");
  for (const auto& [key, value] : cfg.items()) {
    if (descriptive.count(key) || std::find(handled.begin(), handled.end(), key) != handled.end())
      continue;
    const bool neutral = value.is_null() || (value.is_boolean() && !value.get<bool>()) ||
                         ((value.is_array() || value.is_object()) && value.empty());
    if (!neutral)
      throw FileError(source, "\"" + key + "\": " + value.dump() +
                                  " changes what the adapter computes, and graft does not "
                                  "implement it");
  }
}

io::TensorMap base_parameters(const io::TensorMap& rest, const Model& model,
                              const std::string& source) {
  if (rest.empty()) return {};
  // peft's names, back to the checkpoint's: without its prefixes and without the ".base_layer"
  // of the layers a method wraps.
  io::TensorMap checkpoint;
  for (const auto& [key, t] : rest) {
    // bias "all" also sweeps up the inner copies of a modules_to_save wrapper
    // ("classifier.modules_to_save.bias", "classifier.original_module.bias"); peft ignores them
    // on load, and the plain "classifier.bias" beside them is the one in use.
    bool inner_copy = false;
    for (const std::string inner : {".modules_to_save.", ".original_module."})
      if (auto at = key.find(inner); at != std::string::npos) {
        if (!rest.count(key.substr(0, at) + "." + key.substr(at + inner.size())))
          throw FileError(source, "holds '" + key + "' without the module's own '" +
                                      key.substr(0, at) + "." + key.substr(at + inner.size()) +
                                      "'");
        inner_copy = true;
      }
    if (inner_copy) continue;
    std::string name = key;
    for (const std::string& prefix : {kPrefix, std::string("base_model.")})
      if (name.rfind(prefix, 0) == 0) {
        name = name.substr(prefix.size());
        break;
      }
    const std::string wrapped = ".base_layer.";
    if (auto at = name.find(wrapped); at != std::string::npos)
      name.replace(at, wrapped.size(), ".");
    if (!checkpoint.emplace(name, t).second)
      throw FileError(source, "holds the parameter '" + name + "' twice");
  }
  const auto& c = model.config();
  io::TensorMap out;
  try {
    out = models::from_hf(c, checkpoint);
  } catch (const FileError&) {
    throw;
  } catch (const std::exception& e) {
    throw FileError(source, e.what());
  }
  const auto params = model.named_parameters(true);
  for (auto& [name, t] : out) {
    if (!params.contains(name))
      throw FileError(
          source, "replaces '" + name + "', which is no parameter of this " + c.family + " model" +
                      (name == "head.weight" ? " (its head is tied to the embedding)" : ""));
    if (t.sizes() != params[name].sizes())
      throw FileError(source, "'" + name + "' has shape " + c10::str(t.sizes()) +
                                  ", but this model's is " + c10::str(params[name].sizes()));
    const bool q = name.find(".attn.q.") != std::string::npos;
    if (q || name.find(".attn.k.") != std::string::npos)
      t = permute_rope_rows(t, q ? c.num_heads : c.num_kv_heads, RopeStyle::half_split,
                            c.rope_style);
  }
  return out;
}

SavedModules saved_modules(const io::TensorMap& parameters, const Model& model,
                           const std::vector<std::string>& wrapped, bool prompt_learning) {
  SavedModules out;
  if (parameters.empty()) return out;
  const auto& c = model.config();
  io::TensorMap base;
  for (const auto& p : model.named_parameters(true)) base[p.key()] = p.value();
  // Both sides in the checkpoint's names: the model's own, and what is to be saved.
  io::TensorMap all, saved;
  try {
    all = models::to_hf(c, base);
    saved = models::to_hf(c, parameters);
  } catch (const std::out_of_range&) {
    throw Error(
        "peft format: gpt2 keeps q, k and v in one module (c_attn); train all three or "
        "none of them in place");
  }
  auto ends_with = [](const std::string& s, const std::string& suffix) {
    return s.size() > suffix.size() &&
           s.compare(s.size() - suffix.size(), suffix.size(), suffix) == 0;
  };
  const std::string prefix = prompt_learning ? "base_model." : kPrefix;
  std::set<std::string> alone;  // biases saved without their module's weight
  for (const auto& [name, t] : saved) {
    if (ends_with(name, ".bias") && !saved.count(name.substr(0, name.size() - 5) + ".weight")) {
      alone.insert(name.substr(0, name.size() - 5));
      continue;
    }
    const auto module = ends_with(name, ".weight") ? name.substr(0, name.size() - 7) : name;
    if (ends_with(name, ".weight") && all.count(module + ".bias") && !saved.count(module + ".bias"))
      throw Error("peft format: modules_to_save keeps whole modules, but only the weight of '" +
                  module + "' is trained (train its bias too)");
    if (!ends_with(name, ".weight") && !ends_with(name, ".bias"))
      throw Error("peft format: '" + name + "' is not a module's weight or bias");
    out.tensors[prefix + name] = t.detach().contiguous();
    if (std::find(out.modules_to_save.begin(), out.modules_to_save.end(), module) ==
            out.modules_to_save.end() &&
        ends_with(name, ".weight"))
      out.modules_to_save.push_back(module);
  }
  if (alone.empty()) return out;
  if (prompt_learning)
    throw Error("peft format: the prompt-learning methods save no trained biases");
  std::set<std::string> every_bias, wrapped_biases;
  for (const auto& [name, t] : all)
    if (ends_with(name, ".bias")) every_bias.insert(name.substr(0, name.size() - 5));
  for (const auto& w : wrapped)
    if (every_bias.count(w)) wrapped_biases.insert(w);
  std::set<std::string> trained = alone;
  for (const auto& m : out.modules_to_save)
    if (every_bias.count(m)) trained.insert(m);
  if (trained == every_bias)
    out.bias = "all";
  else if (alone == wrapped_biases)
    out.bias = "lora_only";
  else
    throw Error(
        "peft format: its bias setting trains every bias of the model (\"all\") or "
        "those of the adapted layers (\"lora_only\"); these trained biases are neither");
  const std::set<std::string> wrapped_set(wrapped.begin(), wrapped.end());
  for (const auto& module : alone)
    out.tensors[prefix + module + (wrapped_set.count(module) ? ".base_layer.bias" : ".bias")] =
        saved.at(module + ".bias").detach().contiguous();
  return out;
}

void write_adapter(const fs::path& dir, const nlohmann::json& config,
                   const io::TensorMap& tensors) {
  io::MadeFolder folder(dir);  // gone again if writing fails
  io::write_safetensors(dir / "adapter_model.safetensors", tensors, {{"format", "pt"}});
  io::write_atomically(dir / "adapter_config.json",
                       [&](std::ostream& o) { o << config.dump(2) << "\n"; });
  folder.keep();
}

}  // namespace graft::peft
