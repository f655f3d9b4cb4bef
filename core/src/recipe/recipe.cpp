// Recipes: YAML into settings trees with sources, includes, overrides, and the validated schema.
#include <graft/adapter_set.h>
#include <graft/chat.h>
#include <graft/error.h>
#include <graft/io/file.h>
#include <graft/io/json.h>
#include <graft/plugin.h>
#include <graft/recipe.h>
#include <yaml-cpp/yaml.h>

#include <algorithm>
#include <cstdlib>
#include <nlohmann/json.hpp>
#include <regex>
#include <sstream>

#include "build_config.h"
#include "util/file.h"

namespace graft {
namespace fs = std::filesystem;

namespace {

std::string child_path(const std::string& parent, const std::string& key) {
  return parent.empty() ? key : parent + "." + key;
}

// Sources point at the node, or at its key for a map entry (`at`), as people read errors.
Source source_of(const YAML::Mark& mark, const std::string& file) {
  if (file == "command line") return Source{file, 0, 0};
  return Source{file, mark.line + 1, mark.column + 1};
}

// A recipe is small; YAML aliases that refer to each other multiply (a 1 KB file can stand for
// ten million values). Reading stops past this many values.
constexpr std::size_t kMaxYamlValues = 100000;
// And recipe and sweep files are read up to this size.
constexpr std::uintmax_t kMaxYamlBytes = 16u << 20;

Params from_yaml(const YAML::Node& node, const std::string& file, const std::string& path,
                 std::size_t& left, const YAML::Mark* at = nullptr) {
  if (left-- == 0)
    throw FileError(file, "holds more than " + std::to_string(kMaxYamlValues) +
                              " values once its YAML aliases are expanded; a recipe is small "
                              "(are aliases repeating each other?)");
  const Source src = source_of(at ? *at : node.Mark(), file);
  switch (node.Type()) {
    case YAML::NodeType::Map: {
      auto p = Params::map(path, src);
      for (const auto& kv : node) {
        if (!kv.first.IsScalar()) {
          const auto src_key = source_of(kv.first.Mark(), file);
          Params::null(path, src_key).fail("a key must be a name, not a list or a map");
        }
        const auto key = kv.first.Scalar();
        if (p.has(key)) {
          const auto km = kv.first.Mark();
          Params::scalar(key, child_path(path, key), source_of(km, file))
              .fail("this key is given twice");
        }
        const auto key_mark = kv.first.Mark();
        p.set(key, from_yaml(kv.second, file, child_path(path, key), left, &key_mark));
      }
      return p;
    }
    case YAML::NodeType::Sequence: {
      auto p = Params::list(path, src);
      std::size_t i = 0;
      for (const auto& item : node)
        p.add(from_yaml(item, file, path + "[" + std::to_string(i++) + "]", left));
      return p;
    }
    case YAML::NodeType::Scalar:
      return Params::scalar(node.Scalar(), path, src, node.Tag() == "!");
    default:  // `key:` with nothing after it
      return Params::null(path, src);
  }
}

YAML::Node parse_yaml(const std::string& text, const std::string& file) {
  try {
    return YAML::Load(text);
  } catch (const YAML::ParserException& e) {
    throw FileError(
        file + ":" + std::to_string(e.mark.line + 1) + ":" + std::to_string(e.mark.column + 1),
        "YAML syntax: " + e.msg);
  }
}

// `over` wins: maps merge key by key, anything else replaces.
Params merge(const Params& base, const Params& over) {
  if (base.kind() != Params::Kind::map || over.kind() != Params::Kind::map) return over;
  auto out = base;
  for (const auto& [key, v] : over.entries()) {
    if (base.has(key) && base.at(key).kind() == Params::Kind::map && v.kind() == Params::Kind::map)
      out.set(key, merge(base.at(key), v));
    else
      out.set(key, v);
  }
  return out;
}

Params without(const Params& map, const std::string& drop) {
  auto out = Params::map(map.path(), map.source());
  for (const auto& [k, v] : map.entries())
    if (k != drop) out.set(k, v);
  return out;
}

Params expand_includes(const Params& p, std::vector<fs::path>& chain);

// The files an `include` key names, relative to the file it is written in.
std::vector<fs::path> included_files(const Params& include) {
  std::vector<fs::path> files;
  for (const auto& inc : include.as_strings()) {
    auto file = fs::path(include.source().file).parent_path() / inc;
    if (!fs::exists(file)) include.fail("no such file: " + file.string());
    files.push_back(file);
  }
  return files;
}

// Reads an included building block (configs/...), itself expanded; a file including itself,
// directly or not, is an error.
Params read_block(const fs::path& file, std::vector<fs::path>& chain) {
  const auto canonical = fs::weakly_canonical(file);
  if (std::find(chain.begin(), chain.end(), canonical) != chain.end())
    throw FileError(file.string(), "includes itself (through " + chain.back().string() + ")");
  chain.push_back(canonical);
  auto block = expand_includes(read_yaml(file), chain);
  chain.pop_back();
  return block;
}

// Expands `include` keys below the top level: in a map, the included maps come first and the
// map's own keys win (`- {include: ../configs/methods/preset.yaml, r: 16}`); a list item that
// is only `{include: F}` naming a list is replaced by that list's items (a preset of several
// methods). Paths of what is included are those of the place it lands in.
Params expand_includes(const Params& p, std::vector<fs::path>& chain) {
  if (p.kind() == Params::Kind::list) {
    auto out = Params::list(p.path(), p.source());
    for (const auto& item : p.items()) {
      if (item.kind() == Params::Kind::map && item.has("include") && item.entries().size() == 1) {
        const auto files = included_files(item.at("include"));
        if (files.size() == 1) {
          auto block = read_block(files[0], chain);
          if (block.kind() == Params::Kind::list) {
            for (const auto& x : block.items()) out.add(x);
            continue;
          }
        }
      }
      out.add(expand_includes(item, chain));
    }
    return out.rebased(p.path());
  }
  if (p.kind() != Params::Kind::map) return p;
  Params out = Params::map(p.path(), p.source());
  if (p.has("include")) {
    for (const auto& file : included_files(p.at("include"))) {
      auto block = read_block(file, chain);
      if (block.kind() != Params::Kind::map)
        p.at("include").fail(file.string() + " holds a list; include it as a list item");
      out = merge(out, block);
    }
  }
  for (const auto& [key, v] : p.entries()) {
    if (key == "include") continue;
    auto own = Params::map(p.path(), p.source());
    own.set(key, expand_includes(v, chain));
    out = merge(out, own);
  }
  return out.rebased(p.path());
}

Params load_with_includes(const fs::path& path, std::vector<fs::path>& chain) {
  const auto canonical = fs::weakly_canonical(path);
  if (std::find(chain.begin(), chain.end(), canonical) != chain.end())
    throw FileError(path.string(), "includes itself (through " + chain.back().string() + ")");
  chain.push_back(canonical);
  auto p = read_yaml(path);
  if (p.kind() != Params::Kind::map)
    throw FileError(path.string(), "a recipe is a map of keys (model, task, methods, train, ...)");
  if (p.has("include")) {
    Params merged = Params::map("", Source{path.string(), 1, 1});
    for (const auto& inc : p.at("include").as_strings()) {
      auto file = path.parent_path() / inc;
      if (!fs::exists(file)) p.at("include").fail("no such file: " + file.string());
      merged = merge(merged, load_with_includes(file, chain));
    }
    p = merge(merged, without(p, "include"));
  }
  // Includes inside the recipe: building blocks for one section, method presets in a list.
  auto expanded = Params::map(p.path(), p.source());
  for (const auto& [key, v] : p.entries()) expanded.set(key, expand_includes(v, chain));
  chain.pop_back();
  return expanded;
}

// One component of an override path: a key or a list index.
struct Step {
  std::string key;
  std::int64_t index = -1;
};

std::vector<Step> parse_key_path(const std::string& text, const std::string& override_text) {
  std::vector<Step> steps;
  static const std::regex part(R"(([A-Za-z_][A-Za-z0-9_+\-]*)((\[[0-9]+\])*))");
  std::stringstream ss(text);
  std::string piece;
  while (std::getline(ss, piece, '.')) {
    std::smatch m;
    if (!std::regex_match(piece, m, part))
      throw ParamError("command line: \"" + override_text +
                       "\": expected key.path=value, e.g. train.lr=3e-4 or methods[0].r=16");
    steps.push_back({m[1].str()});
    std::string rest = m[2].str();
    static const std::regex index(R"(\[([0-9]+)\])");
    for (std::sregex_iterator it(rest.begin(), rest.end(), index), end; it != end; ++it)
      steps.push_back({"", std::stoll((*it)[1].str())});
  }
  return steps;
}

// Rebuilds `node` with the value at `steps[i..]` replaced.
Params replace(const Params& node, const std::vector<Step>& steps, std::size_t i,
               const Params& value, const std::string& path, const std::string& override_text) {
  if (i == steps.size()) return value;
  const auto& s = steps[i];
  if (s.index >= 0) {
    if (node.kind() != Params::Kind::list ||
        s.index > static_cast<std::int64_t>(node.items().size()))
      throw ParamError("command line: \"" + override_text + "\": " + path + " has no item " +
                       std::to_string(s.index));
    auto out = Params::list(node.path(), node.source());
    const auto sub = path + "[" + std::to_string(s.index) + "]";
    for (std::size_t j = 0; j < node.items().size(); ++j)
      out.add(static_cast<std::int64_t>(j) == s.index
                  ? replace(node.items()[j], steps, i + 1, value, sub, override_text)
                  : node.items()[j]);
    if (s.index == static_cast<std::int64_t>(node.items().size()))
      out.add(replace(Params(), steps, i + 1, value, sub, override_text));
    return out;
  }
  if (node.kind() != Params::Kind::map && !node.is_null())
    throw ParamError("command line: \"" + override_text + "\": " + path + " is not a map");
  auto out = node.is_null() ? Params::map(path, Source{"command line", 0, 0}) : node;
  const auto sub = child_path(path, s.key);
  const Params child = node.has(s.key) ? node.at(s.key) : Params();
  out.set(s.key, replace(child, steps, i + 1, value, sub, override_text));
  return out;
}

// Data files: as given (relative to the recipe), else on the data search path.
std::vector<fs::path> data_search_path(const fs::path& recipe_dir) {
  return io::search_path(
      {recipe_dir}, "GRAFT_DATA",
      {fs::path(GRAFT_DEFAULT_SHARED_DIR) / "data", fs::path(GRAFT_SOURCE_DATA_DIR), "data"});
}

// A run folder's recipe.yaml names files as the recipe it was resolved from did: relative to
// that recipe's folder, which the manifest beside it records.
fs::path recipe_base_dir(const fs::path& file) {
  const auto manifest = file.parent_path() / "manifest.json";
  if (file.filename() == "recipe.yaml" && fs::exists(manifest)) {
    try {
      const auto j = io::read_json_file(manifest);
      const fs::path original = j.value("recipe", std::string());
      if (original.is_absolute()) return original.parent_path();
    } catch (const std::exception&) {
      // not a manifest graft wrote: the recipe's own folder
    }
  }
  return file.parent_path();
}

bool has_glob(const std::string& s) { return s.find_first_of("*?") != std::string::npos; }

// Expands one data entry ("sotu/19*.txt") to existing files, sorted.
std::vector<fs::path> expand(const Params& where, const std::string& entry,
                             const fs::path& recipe_dir) {
  std::vector<fs::path> tried;
  for (const auto& dir : data_search_path(recipe_dir)) {
    const auto full = fs::path(entry).is_absolute() ? fs::path(entry) : dir / entry;
    tried.push_back(full.parent_path());
    if (!has_glob(full.filename().string())) {
      if (fs::is_regular_file(full)) return {full};
      if (fs::is_directory(full)) {
        std::vector<fs::path> files;
        for (const auto& e : fs::directory_iterator(full))
          if (e.is_regular_file()) files.push_back(e.path());
        std::sort(files.begin(), files.end());
        if (!files.empty()) return files;
      }
    } else if (fs::is_directory(full.parent_path())) {
      std::vector<fs::path> files;
      for (const auto& e : fs::directory_iterator(full.parent_path()))
        if (e.is_regular_file() &&
            glob_match(full.filename().string(), e.path().filename().string()))
          files.push_back(e.path());
      std::sort(files.begin(), files.end());
      if (!files.empty()) return files;
    }
    if (fs::path(entry).is_absolute()) break;
  }
  std::string places;
  for (const auto& t : tried) places += (places.empty() ? "" : ", ") + t.string();
  where.fail("no data file matches \"" + entry + "\" (looked in " + places +
             "; run scripts/fetch-data.sh for the public data sets, or set GRAFT_DATA)");
}

std::vector<fs::path> data_files(const Params& task, const std::string& key,
                                 const fs::path& recipe_dir) {
  std::vector<fs::path> out;
  if (!task.has(key)) return out;
  const auto& node = task.at(key);
  for (const auto& entry : node.as_strings()) {
    auto files = expand(node, entry, recipe_dir);
    out.insert(out.end(), files.begin(), files.end());
  }
  return out;
}

double positive_double(const Params& p, const std::string& key, double fallback) {
  if (!p.has(key)) return fallback;
  const auto v = p.at(key).as_double();
  if (!(v > 0)) p.at(key).fail("expected a positive number, got \"" + p.at(key).text() + "\"");
  return v;
}

std::int64_t non_negative(const Params& p, const std::string& key, std::int64_t fallback) {
  return p.has(key) ? p.at(key).as_non_negative_int() : fallback;
}

const Params& section(const Params& root, const std::string& key) {
  static const Params empty;
  if (!root.has(key)) return empty;
  const auto& s = root.at(key);
  if (s.kind() != Params::Kind::map) s.fail("expected a map of settings");
  return s;
}

}  // namespace

Params read_yaml(const fs::path& path) {
  if (!fs::exists(path)) throw FileError(path.string(), "no such file");
  const auto text = io::read_text_file(path, kMaxYamlBytes);
  io::require_text(text, path.string());
  std::size_t left = kMaxYamlValues;
  return from_yaml(parse_yaml(text, path.string()), path.string(), "", left);
}

Params read_yaml_text(const std::string& text, const std::string& name) {
  std::size_t left = kMaxYamlValues;
  return from_yaml(parse_yaml(text, name), name, "", left);
}

namespace {
void emit(YAML::Emitter& out, const Params& p, bool flow) {
  switch (p.kind()) {
    case Params::Kind::map:
      if (flow) out << YAML::Flow;
      out << YAML::BeginMap;
      for (const auto& [k, v] : p.entries()) {
        out << YAML::Key << k << YAML::Value;
        emit(out, v, flow);
      }
      out << YAML::EndMap;
      break;
    case Params::Kind::list:
      if (flow) out << YAML::Flow;
      out << YAML::BeginSeq;
      for (const auto& v : p.items()) emit(out, v, flow);
      out << YAML::EndSeq;
      break;
    case Params::Kind::scalar:
      out << p.text();
      break;
    default:
      out << YAML::Null;
  }
}
}  // namespace

std::string to_yaml(const Params& params) {
  YAML::Emitter out;
  emit(out, params, false);
  return std::string(out.c_str()) + "\n";
}

std::string to_flow_yaml(const Params& params) {
  YAML::Emitter out;
  emit(out, params, true);
  return out.c_str();
}

Params load_recipe(const fs::path& path, const std::vector<std::string>& overrides) {
  std::vector<fs::path> chain;
  auto p = load_with_includes(path, chain);
  for (const auto& o : overrides) {
    const auto eq = o.find('=');
    if (eq == std::string::npos || eq == 0)
      throw ParamError("command line: \"" + o +
                       "\": expected key.path=value, e.g. train.lr=3e-4 or methods[0].r=16");
    const auto key = o.substr(0, eq);
    std::size_t left = kMaxYamlValues;
    auto value = from_yaml(parse_yaml(o.substr(eq + 1), "command line"), "command line", key, left);
    if (value.is_null()) value = Params::scalar("", key, Source{"command line", 0, 0});
    p = replace(p, parse_key_path(key, o), 0, value, "", o);
  }
  return p;
}

Recipe Recipe::from_params(const Params& p, const fs::path& file) {
  Recipe r;
  r.file = file;
  r.params = p;
  const auto dir = recipe_base_dir(file);
  // Every problem is reported at once (up to a limit): each section is checked even when an
  // earlier one failed.
  std::vector<std::string> errors;
  auto collect = [&](const auto& check) {
    try {
      check();
    } catch (const Error& e) {
      errors.push_back(e.what());
    }
  };
  collect([&] {
    p.check_keys(
        {"seed", "model", "task", "methods", "train", "eval", "generate", "output", "checkpoint"});
    r.seed = static_cast<std::uint64_t>(non_negative(p, "seed", 0));
  });

  collect([&] {
    const auto& m = section(p, "model");
    m.check_keys({"path", "family", "dtype", "device", "adapters", "active"});
    if (!m.has("path"))
      (p.has("model") ? m : p).fail("model.path is required: a model file, folder or name");
    r.model.path = m.at("path").as_string();
    r.model.family = m.has("family") ? m.at("family").as_choice({"llama", "gpt2", "bert"}) : "";
    r.model.dtype = m.get_choice("dtype", {"float32", "bfloat16", "float16"}, "float32");
    r.model.device = m.get_string("device", "cpu");
    // Adapter folders as `--adapter` takes them: relative to where graft is started.
    for (const auto& a : m.get_strings("adapters", {})) {
      if (a.empty()) m.at("adapters").fail("an empty adapter path");
      std::pair<std::string, fs::path> named;
      try {
        named = adapter_name_and_path(a);
      } catch (const Error& e) {
        m.at("adapters").fail(e.what());
      }
      for (const auto& n : r.model.adapter_names)
        if (n == named.first)
          m.at("adapters")
              .fail(a + ": another adapter is named '" + n +
                    "' already; name them apart as NAME=PATH");
      r.model.adapter_names.push_back(named.first);
      r.model.adapters.push_back(fs::absolute(named.second));
    }
    if (m.has("active")) {
      r.model.active = m.at("active").as_strings();
      for (const auto& n : *r.model.active)
        if (std::find(r.model.adapter_names.begin(), r.model.adapter_names.end(), n) ==
            r.model.adapter_names.end())
          m.at("active").fail("no adapter named '" + n + "' in model.adapters");
    }
    {
      static const std::regex device(R"(cpu|cuda(:[0-9]+)?)");
      if (!std::regex_match(r.model.device, device))
        m.at("device").fail("expected cpu, cuda or cuda:N, got \"" + r.model.device + "\"");
    }
  });

  collect([&] {
    const auto& t = section(p, "task");
    t.check_keys({"kind", "train", "eval", "eval_fraction", "format", "columns", "text_field",
                  "label_field", "prompt_field", "response_field", "label_rule", "num_labels",
                  "max_length", "packing", "max_documents", "template", "system"});
    r.task.kind =
        t.get_choice("kind", {"causal_lm", "sequence_classification", "instruction"}, "causal_lm");
    if (!t.has("train"))
      (p.has("task") ? t : p).fail("task.train is required: the training data files");
    r.task.format = t.get_choice("format", {"text", "tsv", "csv", "jsonl", "json"},
                                 r.task.kind == "instruction" ? "jsonl" : "text");
    if (r.task.kind != "causal_lm" && r.task.format == "text")
      (t.has("format") ? t.at("format") : t)
          .fail(r.task.kind +
                " needs labelled records: set task.format to tsv, csv, jsonl or json");
    r.task.train = data_files(t, "train", dir);
    r.task.eval = data_files(t, "eval", dir);
    if (t.has("eval_fraction")) {
      r.task.eval_fraction = t.at("eval_fraction").as_probability();
      if (!r.task.eval.empty())
        t.at("eval_fraction").fail("give either task.eval files or task.eval_fraction, not both");
    }
    r.task.columns = t.get_strings("columns", {});
    if (t.has("columns") && r.task.format != "tsv" && r.task.format != "csv")
      t.at("columns").fail("names the columns of tsv and csv files; this task's format is " +
                           r.task.format);
    r.task.text_field = t.get_string("text_field", "text");
    r.task.label_field = t.get_string("label_field", "label");
    r.task.prompt_field = t.get_string("prompt_field", "prompt");
    r.task.response_field = t.get_string("response_field", "response");
    {
      auto formats = ChatTemplate::names();
      formats.insert(formats.begin(), {"none", "chat"});
      r.task.chat_template = t.get_choice("template", formats, "none");
    }
    r.task.system = t.get_string("system", "");
    if (r.task.kind != "instruction")
      for (const auto* key : {"template", "system"})
        if (t.has(key))
          t.at(key).fail("applies to instruction tasks (task.kind: instruction), not " +
                         r.task.kind);
    if (t.has("system") && r.task.chat_template == "none")
      t.at("system").fail("a system message needs a chat template: set task.template");
    r.task.label_rule = t.get_choice("label_rule", {"none", "sign"}, "none");
    r.task.num_labels = t.get_positive_int("num_labels", 2);
    if (r.task.kind == "sequence_classification" && r.task.num_labels < 2)
      t.at("num_labels").fail("a classifier needs at least 2 labels");
    r.task.max_length = t.get_positive_int("max_length", 128);
    if (r.task.max_length < 2) t.at("max_length").fail("expected at least 2 tokens");
    r.task.packing = t.get_bool("packing", true);
    r.task.max_documents = non_negative(t, "max_documents", 0);
  });

  collect([&] {
    if (!p.has("methods"))
      p.fail("methods is required: a list of maps, each with the method's name and its settings");
    r.methods = p.at("methods");
    if (r.methods.kind() != Params::Kind::list || r.methods.items().empty())
      r.methods.fail("expected a list of methods, each a map with a name");
    for (const auto& method : r.methods.items())
      collect([&] {
        if (method.kind() != Params::Kind::map || !method.has("name"))
          method.fail("expected a map with the method's name and its settings ({name: ..., ...})");
        if (method.has("from")) {  // continued: the settings are the saved adapter's
          method.check_keys({"name", "from"});
          const auto from = fs::absolute(method.at("from").as_string());
          if (!fs::exists(from)) method.at("from").fail("no adapter at " + from.string());
          return;
        }
        make_method(method.at("name").as_string(), method);  // validates the method's own keys
      });
  });

  collect([&] {
    const auto& tr = section(p, "train");
    tr.check_keys({"steps", "epochs", "batch_size", "gradient_accumulation", "optimizer", "lr",
                   "weight_decay", "momentum", "beta1", "beta2", "eps", "schedule", "warmup_steps",
                   "max_grad_norm", "log_every", "precision"});
    r.train.steps = non_negative(tr, "steps", 0);
    r.train.epochs = tr.get_positive_int("epochs", 1);
    if (tr.has("steps") && tr.has("epochs"))
      tr.at("epochs").fail("give either train.steps or train.epochs, not both");
    r.train.batch_size = tr.get_positive_int("batch_size", 8);
    r.train.gradient_accumulation = tr.get_positive_int("gradient_accumulation", 1);
    r.train.optimizer = tr.get_choice("optimizer", {"adamw", "sgd"}, "adamw");
    r.train.lr = positive_double(tr, "lr", 1e-3);
    if (tr.has("weight_decay") && tr.at("weight_decay").as_double() < 0)
      tr.at("weight_decay").fail("expected a number >= 0");
    r.train.weight_decay = tr.get_double("weight_decay", 0.0);
    r.train.momentum = tr.has("momentum") ? tr.at("momentum").as_probability() : 0.0;
    r.train.beta1 = tr.has("beta1") ? tr.at("beta1").as_probability() : 0.9;
    r.train.beta2 = tr.has("beta2") ? tr.at("beta2").as_probability() : 0.999;
    r.train.eps = positive_double(tr, "eps", 1e-8);
    r.train.schedule = tr.get_choice("schedule", {"constant", "linear", "cosine"}, "constant");
    r.train.warmup_steps = non_negative(tr, "warmup_steps", 0);
    if (tr.has("max_grad_norm") && tr.at("max_grad_norm").as_double() < 0)
      tr.at("max_grad_norm").fail("expected a number >= 0 (0 turns clipping off)");
    r.train.max_grad_norm = tr.get_double("max_grad_norm", 1.0);
    r.train.log_every = tr.get_positive_int("log_every", 10);
    r.train.precision = tr.get_choice("precision", {"float32", "bf16"}, "float32");
    if (r.train.precision == "bf16" && r.model.dtype != "float32")
      tr.at("precision")
          .fail("bf16 autocast keeps float32 master weights, but model.dtype is " + r.model.dtype +
                ": use one or the other");
    if (r.train.steps && r.train.warmup_steps > r.train.steps)
      tr.at("warmup_steps")
          .fail("warmup_steps " + std::to_string(r.train.warmup_steps) + " is longer than the " +
                std::to_string(r.train.steps) + " steps");
  });

  collect([&] {
    const auto& ev = section(p, "eval");
    ev.check_keys({"every", "batches", "metrics"});
    r.eval.every = non_negative(ev, "every", 0);
    r.eval.batches = non_negative(ev, "batches", 0);
    const std::vector<std::string> lm = {"loss", "perplexity", "accuracy"},
                                   cls = {"loss", "accuracy", "f1"};
    const auto& allowed = r.task.kind == "sequence_classification" ? cls : lm;
    r.eval.metrics =
        ev.get_strings("metrics", r.task.kind == "sequence_classification"
                                      ? std::vector<std::string>{"loss", "accuracy", "f1"}
                                      : std::vector<std::string>{"loss", "perplexity"});
    if (ev.has("metrics"))
      for (std::size_t i = 0; i < r.eval.metrics.size(); ++i) {
        const auto& node = ev.at("metrics").kind() == Params::Kind::list
                               ? ev.at("metrics").items()[i]
                               : ev.at("metrics");
        node.as_choice(allowed);
      }
  });

  collect([&] {
    const auto& g = section(p, "generate");
    g.check_keys({"prompt", "max_new_tokens"});
    r.generate.prompt = g.get_string("prompt", "");
    r.generate.max_new_tokens = g.get_positive_int("max_new_tokens", 48);
  });

  collect([&] {
    const auto& o = section(p, "output");
    o.check_keys({"dir", "save_adapter"});
    r.output.dir =
        o.has("dir") ? fs::path(o.at("dir").as_string()) : fs::path("runs") / file.stem();
    // A run folder's own recipe.yaml, its output.dir not overridden, is that run folder wherever
    // graft is started (output.dir is relative to where the run was started).
    if (dir != file.parent_path() && o.has("dir") && o.at("dir").source().file == file.string())
      r.output.dir = file.parent_path();
    r.output.save_adapter = o.get_bool("save_adapter", true);
  });

  collect([&] {
    const auto& c = section(p, "checkpoint");
    c.check_keys({"every", "keep"});
    r.checkpoint.every = non_negative(c, "every", 0);
    r.checkpoint.keep = c.get_positive_int("keep", 2);
  });

  if (!errors.empty()) {
    const std::size_t limit = 10;
    std::string all;
    for (std::size_t i = 0; i < errors.size() && i < limit; ++i) all += (i ? "\n" : "") + errors[i];
    if (errors.size() > limit)
      all += "\n(and " + std::to_string(errors.size() - limit) + " more problems)";
    throw ParamError(all);
  }
  return r;
}

fs::path shipped_recipes_root() {
  for (const fs::path& dir : {fs::path(GRAFT_SOURCE_DIR), fs::path(GRAFT_INSTALL_DATA_DIR)})
    if (fs::is_directory(dir / "recipes")) return dir;
  throw Error(std::string("the shipped recipes are in neither ") + GRAFT_SOURCE_DIR +
              "/recipes nor " + GRAFT_INSTALL_DATA_DIR + "/recipes");
}

}  // namespace graft
