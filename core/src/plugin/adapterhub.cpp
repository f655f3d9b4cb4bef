// AdapterHub's adapter folders: the files, unions, Stack compositions and static heads. What each
// part computes is read by the plugins (graft/adapterhub.h).
#include <graft/adapter.h>
#include <graft/adapterhub.h>
#include <graft/error.h>
#include <graft/io/file.h>
#include <graft/io/json.h>
#include <graft/io/safetensors.h>
#include <graft/peft.h>
#include <graft/plugin.h>
#include <torch/torch.h>

#include <set>

#include "util/file.h"

namespace graft::adapterhub {
namespace fs = std::filesystem;
using nlohmann::json;

namespace {

const char* kConfig = "adapter_config.json";
const char* kSetup = "adapter_setup.json";
const char* kWeights = "adapter.safetensors";
const char* kPickle = "pytorch_adapter.bin";
const char* kHeadConfig = "head_config.json";
const char* kHeadWeights = "model_head.safetensors";
const char* kHeadPickle = "pytorch_model_head.bin";

// The version string AdapterHub writes, which graft writes too (the layout of adapters 1.x).
const char* kVersion = "adapters.1.1.0";

bool is_version(const json& cfg) {
  const auto& v = cfg.value("version", json());
  return v.is_string() && v.get<std::string>().rfind("adapters.", 0) == 0;
}

// The safetensors file of a folder; a folder with only the pickle is refused.
io::TensorMap read_weights(const fs::path& dir, const char* file, const char* pickle) {
  if (fs::exists(dir / file)) return io::read_safetensors(dir / file).tensors;
  if (fs::exists(dir / pickle))
    throw FileError((dir / pickle).string(),
                    "holds pickled weights, which graft never unpickles; save the adapter with "
                    "use_safetensors=True (AdapterHub's save_adapter), or convert the file");
  throw FileError(dir.string(), std::string("has no ") + file);
}

// The parts of a configuration: a union's configurations, or the one.
std::vector<json> parts_of(const json& config, const std::string& source) {
  if (!config.is_object())
    throw FileError(source, "\"config\" is " + config.dump() + ", expected an object");
  if (config.value("architecture", json()) != "union") return {config};
  const auto& list = config.value("configs", json());
  if (!list.is_array() || list.empty())
    throw FileError(source, "a union configuration needs a non-empty \"configs\" list");
  std::vector<json> out;
  for (const auto& part : list) {
    if (part.value("architecture", json()) == "union")
      throw FileError(source, "a union inside a union is not an AdapterHub configuration");
    out.push_back(part);
  }
  return out;
}

// The name one part is known by in errors: its architecture, or the bottleneck family.
std::string describe(const json& part) {
  const auto& a = part.value("architecture", json());
  return a.is_string() ? a.get<std::string>() : "bottleneck (architecture null)";
}

// The static head of an adapter folder: tensors the model's own head has, which must equal the
// model's (AdapterHub saves a copy of the model's head beside every adapter).
void read_head(const fs::path& dir, Model& model) {
  if (!fs::exists(dir / kHeadConfig)) return;
  const auto cfg_path = (dir / kHeadConfig).string();
  const auto cfg = io::read_json_file(dir / kHeadConfig);
  if (!cfg.value("config", json()).is_null())
    throw FileError(cfg_path, "holds an AdapterHub flex head (\"config\": " +
                                  cfg.at("config").dump().substr(0, 80) +
                                  "), which graft does not implement; graft uses the model's own "
                                  "head (a static head has \"config\": null)");
  const auto tensors = read_weights(dir, kHeadWeights, kHeadPickle);
  const auto source = (dir / kHeadWeights).string();
  io::TensorMap named;
  const auto current = model.named_parameters(true);
  for (const auto& [name, t] : tensors) {
    // A head tied to the embedding (GPT-2's lm_head) is saved as a copy of it: equal, nothing
    // to load; a different one cannot be loaded without untying the model's head.
    const auto* embed = current.find("embed.weight");
    if (name == "lm_head.weight" && !current.find("head.weight") && embed) {
      if (!torch::equal(embed->detach().to(torch::kFloat).cpu(), t.to(torch::kFloat).cpu()))
        throw FileError(source,
                        "'lm_head.weight' differs from this model's embedding, to which "
                        "its head is tied; graft does not untie heads");
      continue;
    }
    named[peft::kPrefix + name] = t;
  }
  const auto parameters = peft::base_parameters(named, model, source);
  io::TensorMap changed;
  for (const auto& [name, t] : parameters) {
    const auto* p = current.find(name);
    if (!p || !torch::equal(p->detach().to(torch::kFloat).cpu(), t.to(torch::kFloat).cpu()))
      changed[name] = t;
  }
  if (changed.empty()) return;
  // A trained static head: the model's own head with other values. Not loaded yet.
  throw FileError(source, "holds a head whose '" + changed.begin()->first +
                              "' differs from this model's; graft reads AdapterHub's static "
                              "heads only where they equal the model's own (load the trained "
                              "head into the model first)");
}

// Detaches what a load attached before it failed: a refused file leaves the model as it was.
struct Undo {
  Model& model;
  std::vector<std::unique_ptr<Method>>& methods;
  bool done = false;
  ~Undo() {
    if (done) return;
    for (auto it = methods.rbegin(); it != methods.rend(); ++it) (*it)->detach(model);
  }
};

// One adapter folder (adapter_config.json + adapter.safetensors), its methods appended to `out`.
void load_one(const fs::path& dir, Model& model, std::vector<std::unique_ptr<Method>>& out) {
  const auto cfg_path = (dir / kConfig).string();
  if (!fs::exists(dir / kConfig)) throw FileError(dir.string(), "has no adapter_config.json");
  const auto cfg = io::read_json_file(dir / kConfig);
  const auto name = cfg.value("name", json());
  if (!name.is_string() || name.get<std::string>().empty())
    throw FileError(cfg_path, "has no adapter \"name\" (AdapterHub names every adapter)");
  const auto hidden = cfg.value("hidden_size", json());
  if (hidden.is_number_integer() && hidden.get<std::int64_t>() != model.config().hidden_size)
    throw FileError(cfg_path, "the adapter was saved for hidden_size " + hidden.dump() +
                                  ", but this model has " +
                                  std::to_string(model.config().hidden_size));
  auto tensors = read_weights(dir, kWeights, kPickle);
  const auto source = (dir / kWeights).string();
  const auto formats = adapter_formats();
  for (const auto& part : parts_of(cfg.value("config", json()), cfg_path)) {
    const AdapterFormat* reader = nullptr;
    for (const auto& f : formats)
      if (f.name == kFormat && f.reads_part && f.read_part && f.reads_part(part)) reader = &f;
    if (!reader)
      throw FileError(cfg_path, "AdapterHub configuration " + describe(part) +
                                    " is not read by any loaded plugin ('graft methods' lists "
                                    "them; for the bottleneck family: the bottleneck plugin)");
    for (auto& m : reader->read_part(part, name.get<std::string>(), tensors, model, source))
      out.push_back(std::move(m));
  }
  if (!tensors.empty())
    throw FileError(source, "tensor '" + tensors.begin()->first + "' (and " +
                                std::to_string(tensors.size() - 1) +
                                " more) belongs to no part of the configuration graft reads");
  read_head(dir, model);
}

// The adapter names of a composition, in order: a Stack of singles, or one single.
std::vector<std::string> stacked(const json& block, const std::string& source) {
  const auto type = block.value("type", json());
  const auto& children = block.value("children", json::array());
  if (type == "single") {
    if (!children.is_array() || children.size() != 1 || !children[0].is_string())
      throw FileError(source, "a \"single\" block needs one adapter name");
    return {children[0].get<std::string>()};
  }
  if (type != "Stack")
    throw FileError(source, "composition " + type.dump() +
                                " is not implemented (graft reads Stack and single blocks)");
  std::vector<std::string> out;
  for (const auto& child : children) {
    auto names = child.is_string() ? std::vector<std::string>{child.get<std::string>()}
                                   : stacked(child, source);
    out.insert(out.end(), names.begin(), names.end());
  }
  return out;
}

}  // namespace

bool is_adapter(const fs::path& dir) {
  try {
    if (fs::exists(dir / kSetup)) return is_version(io::read_json_file(dir / kSetup));
    if (!fs::exists(dir / kConfig)) return false;
    const auto cfg = io::read_json_file(dir / kConfig);
    return cfg.contains("config") && is_version(cfg);
  } catch (const std::exception&) {
    return false;
  }
}

std::vector<std::unique_ptr<Method>> load(const fs::path& dir, Model& model) {
  std::vector<std::unique_ptr<Method>> out;
  Undo undo{model, out};
  if (!fs::exists(dir / kSetup)) {
    load_one(dir, model, out);
    undo.done = true;
    return out;
  }
  const auto source = (dir / kSetup).string();
  const auto setup = io::read_json_file(dir / kSetup);
  if (!setup.value("head_setup", json()).is_null())
    throw FileError(source, "has a head_setup, which graft does not implement");
  for (const auto& name : stacked(setup.value("adapter_setup", json()), source)) {
    if (name.empty() || name.find('/') != std::string::npos || name == "." || name == "..")
      throw FileError(source, "adapter name \"" + name + "\" is not a folder name");
    if (!fs::is_directory(dir / name))
      throw FileError(source, "names adapter \"" + name + "\", but " + (dir / name).string() +
                                  " is not a folder");
    load_one(dir / name, model, out);
  }
  undo.done = true;
  return out;
}

void save(const fs::path& dir, const Model& model, const std::vector<Method*>& methods,
          const std::string& name) {
  json parts = json::array();
  io::TensorMap tensors;
  const auto formats = adapter_formats();
  for (auto* method : methods) {
    const AdapterFormat* writer = nullptr;
    for (const auto& f : formats)
      if (f.name == kFormat && f.method == method->name() && f.write_part) writer = &f;
    if (!writer) {
      std::string list;
      for (const auto& f : formats)
        if (f.name == kFormat && f.write_part) list += (list.empty() ? "" : ", ") + f.method;
      throw Error(method->name() + ": has no place in an AdapterHub adapter (its writers: " +
                  (list.empty() ? "none loaded" : list) + ")");
    }
    auto [part, own] = writer->write_part(*method, model, name);
    for (auto& [key, t] : own) {
      if (tensors.count(key))
        throw Error(method->name() + ": tensor '" + key + "' is written by two methods");
      tensors[key] = t.detach().to(torch::kFloat).contiguous();
    }
    parts.push_back(part);
  }
  if (parts.empty()) throw Error("nothing to write: the adapter has no methods");
  const auto& c = model.config();
  json cfg = {{"config",
               parts.size() == 1 ? parts[0] : json{{"architecture", "union"}, {"configs", parts}}},
              {"hidden_size", c.hidden_size},
              {"model_class", c.architecture},
              {"model_name", c.name_or_path.empty() ? json() : json(c.name_or_path)},
              {"model_type", c.family == "bert" && c.roberta_positions ? "roberta" : c.family},
              {"name", name},
              {"version", kVersion}};
  io::MadeFolder folder(dir);
  io::write_safetensors(dir / kWeights, tensors, {});
  io::write_atomically(dir / kConfig, [&](std::ostream& o) { o << cfg.dump(2) << "\n"; });
  folder.keep();
}

std::string base_prefix(const ModelConfig& c) {
  if (c.family == "llama") return "model.";
  if (c.family == "gpt2") return "transformer.";
  return c.classifier.empty() ? "" : (c.roberta_positions ? "roberta." : "bert.");
}

std::string bottleneck_location(const ModelConfig& c, const Site& site) {
  const bool attention = site.point == "attn.out";
  if (!attention && site.point != "ffn.out")
    throw Error("AdapterHub: site '" + site.name + "' is not a sublayer output");
  const auto L = std::to_string(site.layer);
  if (c.family == "bert")
    return base_prefix(c) + "encoder.layer." + L + (attention ? ".attention.output" : ".output");
  const auto layer = c.family == "gpt2" ? "transformer.h." + L : "model.layers." + L;
  return layer + (attention ? ".attention_adapters" : ".output_adapters");
}

std::string attention_module(const ModelConfig& c, std::int64_t layer) {
  const auto L = std::to_string(layer);
  if (c.family == "bert") return base_prefix(c) + "encoder.layer." + L + ".attention.self";
  if (c.family == "gpt2") return "transformer.h." + L + ".attn";
  return "model.layers." + L + ".self_attn";
}

std::vector<std::unique_ptr<Method>> attach_part(
    std::unique_ptr<Method> method, Model& model, const std::string& source,
    const std::function<io::TensorMap(Method& attached)>& state) {
  try {
    method->attach(model);
  } catch (const Error& e) {
    throw FileError(source, std::string("cannot attach to this model: ") + e.what());
  }
  try {
    method->load_state(state(*method), source);
  } catch (...) {
    method->detach(model);
    throw;
  }
  std::vector<std::unique_ptr<Method>> out;
  out.push_back(std::move(method));
  return out;
}

AdapterFormat part_format(const std::string& method,
                          std::function<bool(const nlohmann::json&)> reads,
                          decltype(AdapterFormat::read_part) read,
                          decltype(AdapterFormat::write_part) write) {
  AdapterFormat f;
  f.name = kFormat;
  f.method = method;
  f.reads_part = std::move(reads);
  f.read_part = std::move(read);
  f.write_part = std::move(write);
  return f;
}

at::Tensor take(io::TensorMap& tensors, const std::string& key, const std::string& source) {
  auto it = tensors.find(key);
  if (it == tensors.end()) throw FileError(source, "has no tensor '" + key + "'");
  auto t = it->second;
  tensors.erase(it);
  return t;
}

void check_part(const json& part, const std::string& source,
                const std::vector<std::string>& handled) {
  // Keys that change nothing a loaded adapter computes: training-time settings and names.
  static const std::set<std::string> inert = {"architecture",
                                              "dropout",
                                              "init_weights",
                                              "prompt_init",
                                              "prompt_init_text",
                                              "stochastic_depth",
                                              "dtype",
                                              "phm_c_init",
                                              "phm_init_range",
                                              "hypercomplex_nonlinearity",
                                              "learn_phm",
                                              "inv_adapter_reduction_factor"};
  const std::set<std::string> known(handled.begin(), handled.end());
  for (const auto& [key, value] : part.items()) {
    if (known.count(key) || inert.count(key)) continue;
    const bool neutral = value.is_null() || value == false || value == 0 ||
                         (value.is_array() && value.empty()) ||
                         (value.is_object() && value.empty());
    if (!neutral)
      throw FileError(source, "AdapterHub " + describe(part) + " setting \"" + key +
                                  "\": " + value.dump() +
                                  " changes what the adapter computes, and graft does not "
                                  "implement it");
  }
}

}  // namespace graft::adapterhub
