#include "fuzz/harness.h"

#include <graft/adapter.h>
#include <graft/error.h>
#include <graft/io/file.h>
#include <graft/io/safetensors.h>
#include <graft/load.h>
#include <graft/plugin.h>
#include <graft/recipe.h>
#include <graft/sweep.h>
#include <graft/tokenizer.h>
#include <torch/torch.h>

#include <algorithm>
#include <chrono>
#include <fstream>
#include <functional>
#include <nlohmann/json.hpp>
#include <set>
#include <sstream>
#include <stdexcept>

#include "tiny_models.h"
#include "tokenizer_files.h"

namespace graft::fuzz {
namespace {

namespace fs = std::filesystem;
using nlohmann::json;

std::string slurp(const fs::path& path) {
  std::ifstream in(path, std::ios::binary);
  std::ostringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

void put(const fs::path& path, const std::string& bytes) {
  fs::create_directories(path.parent_path());
  std::ofstream(path, std::ios::binary) << bytes;
}

// Every file under `dir`, relative to it.
std::set<std::string> files_under(const fs::path& dir) {
  std::set<std::string> out;
  for (const auto& e : fs::recursive_directory_iterator(dir))
    if (!e.is_directory()) out.insert(fs::relative(e.path(), dir).string());
  return out;
}

// A folder written by graft's writers, read back as seeds: one seed per file, the folder's other
// files its companions. `prefix` is where the folder sits in the work folder.
std::vector<Seed> seeds_of_folder(const fs::path& dir, const std::string& prefix,
                                  const std::map<std::string, std::string>& extra = {}) {
  std::map<std::string, std::string> all;
  for (const auto& name : files_under(dir)) all[prefix + name] = slurp(dir / name);
  std::vector<Seed> out;
  for (const auto& [name, bytes] : all) {
    Seed s{name, bytes, extra};
    for (const auto& [other, b] : all)
      if (other != name) s.companions[other] = b;
    out.push_back(std::move(s));
  }
  return out;
}

struct Scratch {  // a temporary folder for making seeds
  fs::path path = fs::temp_directory_path() /
                  ("graft-fuzz-seeds-" + std::to_string(::getpid()) + "-" +
                   std::to_string(std::chrono::steady_clock::now().time_since_epoch().count()));
  Scratch() { fs::create_directories(path); }
  ~Scratch() {
    std::error_code ec;
    fs::remove_all(path, ec);
  }
};

Params settings(const json& j) { return params_from_json(j, "fuzz seed", "methods[0]"); }

// The base model every adapter seed is made for and read onto: the tiny model of a family.
std::shared_ptr<Model> base_model(const std::string& family) {
  auto model = test::tiny_model(family, 5, 0.2);
  model->set_tokenizer(test::toy_tokenizer(model->config().vocab_size));
  return model;
}

// Uses a model that loaded: one forward pass over the first few token ids. A configuration the
// forward cannot run must have been refused by the reader.
void forward(Model& model) {
  torch::NoGradGuard no_grad;
  const auto& c = model.config();
  const auto n =
      std::min<std::int64_t>({3, c.vocab_size, std::max<std::int64_t>(c.max_positions, 1)});
  auto ids = torch::arange(n, torch::kLong).unsqueeze(0);
  ForwardInput in{ids, torch::ones_like(ids), {}, {}};
  if (c.family == "bert") in.token_type_ids = torch::zeros_like(ids);
  model.forward(in, nullptr);
}

// --- the targets -----------------------------------------------------------------------------

void parse_safetensors(const fs::path& dir, const std::string& file) {
  const auto f = io::read_safetensors(dir / file);
  double sum = 0;
  for (const auto& [name, t] : f.tensors) sum += t.to(torch::kDouble).sum().item<double>();
  (void)sum;
}

std::vector<Seed> safetensors_seeds() {
  Scratch s;
  io::TensorMap t;
  t["a.weight"] = torch::randn({3, 4});
  t["b"] = torch::arange(5, torch::kLong);
  t["c.half"] = torch::ones({2, 2}, torch::kHalf);
  t["d.bf16"] = torch::ones({4}, torch::kBFloat16);
  t["e.empty"] = torch::zeros({0, 3});
  io::write_safetensors(s.path / "a.safetensors", t, {{"format", "pt"}});
  return {{"model.safetensors", slurp(s.path / "a.safetensors"), {}}};
}

void parse_gguf(const fs::path& dir, const std::string& file) {
  auto loaded = load_model((dir / file).string());
  forward(*loaded.model);
  if (loaded.tokenizer) loaded.tokenizer->decode(loaded.tokenizer->encode("Once upon a time"));
}

std::vector<Seed> gguf_seeds() {
  Scratch s;
  std::vector<Seed> out;
  auto model = base_model("llama");
  save_gguf_model(*model, s.path / "m.gguf");
  out.push_back({"model.gguf", slurp(s.path / "m.gguf"), {}});
  save_gguf_model(*model, s.path / "q.gguf", {}, c10::ScalarType::Undefined, true);
  out.push_back({"model.gguf", slurp(s.path / "q.gguf"), {}});
  return out;
}

void parse_hf_folder(const fs::path& dir, const std::string&) {
  auto loaded = load_model((dir / "model").string());
  forward(*loaded.model);
}

std::vector<Seed> hf_folder_seeds() {
  Scratch s;
  std::vector<Seed> out;
  for (const char* family : {"llama", "gpt2", "bert"}) {
    auto config = test::tiny_config(family);
    if (config.family == "llama") config.architecture = "LlamaForCausalLM";
    if (config.family == "gpt2") config.architecture = "GPT2LMHeadModel";
    auto model = models::make_model(config);
    models::init_parameters(*model, 3, 0.2);
    const auto dir = s.path / family;
    save_hf_model(*model, dir);
    for (auto& seed : seeds_of_folder(dir, "model/")) out.push_back(std::move(seed));
  }
  return out;
}

void parse_tokenizer(const fs::path& dir, const std::string& file) {
  auto tok = load_tokenizer_json(dir / file);
  for (const std::string text : {"Hello, wörld! 42", " the  cat\n", "[CLS] <s> x"})
    tok->decode(tok->encode(text));
}

// The tokenizer tests' tokenizer.json files, one of each kind graft reads.
std::vector<Seed> tokenizer_seeds() {
  const json byte_level = test::gpt2_style_tokenizer();
  const json sentencepiece = test::llama_style_tokenizer();
  const json wordpiece = test::bert_style_tokenizer();
  std::vector<Seed> out;
  for (const auto* j : {&byte_level, &sentencepiece, &wordpiece})
    out.push_back({"tokenizer.json", j->dump(1), {}});
  return out;
}

// The adapter targets read what the first path component of the fuzzed file names (a folder, or
// a GGUF adapter file) onto the tiny model of the family written in the companion "base".
void parse_adapter(const fs::path& dir, const std::string& file) {
  auto model = base_model(slurp(dir / "base"));
  load_adapter(dir / fs::path(file).begin()->string(), *model);
  forward(*model);
}

std::vector<Seed> adapter_seeds(const std::string& format) {
  load_plugins();
  Scratch s;
  std::vector<Seed> out;
  const std::vector<std::tuple<std::string, std::string, json>> cases = {
      {"llama", "lora", {{"r", 2}, {"targets", {"attn.q", "attn.v"}}}},
      {"gpt2", "lora", {{"r", 2}, {"targets", {"all-linear"}}}},
      {"llama", "ia3", json::object()},
      {"gpt2", "ia3", json::object()},
      {"llama", "loha", {{"r", 2}}},
      {"llama", "prefix_tuning", {{"num_virtual_tokens", 2}}},
      {"llama", "prompt_tuning", {{"num_virtual_tokens", 2}}},
      {"llama", "pfeiffer", {{"reduction_factor", 4}}},
      {"llama", "compacter", {{"reduction_factor", 4}}},
  };
  int n = 0;
  for (const auto& [family, method, keys] : cases) {
    if (format == "peft" && (method == "pfeiffer" || method == "compacter")) continue;
    auto model = base_model(family);
    auto m = make_method(method, settings(keys));
    m->attach(*model);
    {
      torch::NoGradGuard no_grad;  // away from the initial values: every tensor matters
      for (auto& [name, t] : m->trainable_parameters()) t.add_(torch::randn_like(t) * 0.1);
    }
    const auto dir = s.path / std::to_string(n++);
    fs::create_directories(dir);
    if (format == "graft")
      save_adapter(dir / "adapter", *model, {m.get()});
    else
      save_adapter_as(format, dir / (format == "gguf" ? "lora.gguf" : "adapter"), *model,
                      {m.get()});
    for (auto& seed : seeds_of_folder(dir, "", {{"base", family}})) out.push_back(std::move(seed));
    if (format == "gguf") break;  // GGUF holds LoRA only
  }
  return out;
}

void parse_recipe(const fs::path& dir, const std::string& file) {
  Recipe::from_params(load_recipe(dir / file), dir / file);
}

const char* kRecipe = R"(seed: 7
model:
  path: model.gguf
task:
  kind: causal_lm
  train: data/train.txt
  eval: data/*.txt
  max_length: 32
methods:
  - name: lora
    r: 4
    targets: [all-linear]
  - {name: ia3, targets: [ffn.down], layers: [0, "1-2"]}
train:
  steps: 12
  batch_size: 2
  gradient_accumulation: 2
  optimizer: adamw
  lr: 3.0e-3
  weight_decay: 0.01
  max_grad_norm: 1.0
  schedule: linear
eval:
  every: 4
  batches: 3
  metrics: [loss, perplexity, accuracy]
generate:
  prompt: "the cat"
  max_new_tokens: 8
checkpoint: {every: 2, keep: 1}
output:
  dir: runs/lm
)";

std::map<std::string, std::string> recipe_companions() {
  return {{"data/train.txt", "the cat sat on the mat.\n"}, {"model.gguf", "not read"}};
}

std::vector<Seed> recipe_seeds() {
  auto c = recipe_companions();
  std::vector<Seed> out = {{"recipe.yaml", kRecipe, c}};
  c["base.yaml"] = kRecipe;
  out.push_back({"recipe.yaml",
                 "include: base.yaml\nmethods:\n  - {name: lora, r: &r 8, alpha: *r}\n  - {name: "
                 "lora, targets: [ffn.up], r: *r}\ntrain: {steps: 3, optimizer: sgd}\n",
                 c});
  return out;
}

void parse_sweep(const fs::path& dir, const std::string& file) { load_sweep(dir / file); }

std::vector<Seed> sweep_seeds() {
  auto c = recipe_companions();
  c["lm.yaml"] = kRecipe;
  return {{"sweep.yaml",
           "recipe: lm.yaml\noutput: sweeps/a\nseeds: [0, 1]\nmetric: loss\ngrid:\n  "
           "methods[0].r: [2, 4]\n  train.lr: [1.0e-3, 1.0e-2]\n",
           c},
          {"sweep.yaml",
           "recipe: lm.yaml\noutput: sweeps/b\nset:\n  train.steps: 3\ncases:\n  - {label: a, "
           "set: {\"methods[0].targets\": [attn.q]}}\n  - {label: b, set: {train.lr: 0.1}}\n",
           c}};
}

// Library words an error for people must not carry.
const char* const kJargon[] = {"json.exception",
                               "INTERNAL ASSERT",
                               "alloc_cpu",
                               "stoi",
                               "stol",
                               "stod",
                               "stoull",
                               "index out of range",
                               "bad_alloc",
                               "basic_string",
                               "vector::",
                               "yaml-cpp",
                               "bad conversion",
                               "std::",
                               "c10::",
                               "Exception raised from",
                               "bad_function_call"};

}  // namespace

const std::vector<Target>& targets() {
  static const std::vector<Target> all = {
      {"safetensors", "a .safetensors file, every tensor read", parse_safetensors,
       safetensors_seeds},
      {"gguf", "a GGUF model: metadata, tokenizer, tensors, a forward pass", parse_gguf,
       gguf_seeds},
      {"hf-folder", "a Hugging Face folder (config.json, model.safetensors), a forward pass",
       parse_hf_folder, hf_folder_seeds},
      {"tokenizer", "tokenizer.json (byte-level BPE, SentencePiece BPE, WordPiece), encoded",
       parse_tokenizer, tokenizer_seeds},
      {"peft-adapter", "peft adapters (config and tensors) loaded onto a model, a forward pass",
       parse_adapter, [] { return adapter_seeds("peft"); }},
      {"graft-adapter", "graft adapters (adapter.json, tensors) loaded, a forward pass",
       parse_adapter, [] { return adapter_seeds("graft"); }},
      {"gguf-adapter", "a llama.cpp GGUF LoRA adapter loaded, a forward pass", parse_adapter,
       [] { return adapter_seeds("gguf"); }},
      {"recipe", "recipe YAML with includes, anchors and merges, validated", parse_recipe,
       recipe_seeds},
      {"sweep", "sweep YAML (grid, cases, seeds) expanded over a recipe", parse_sweep, sweep_seeds},
  };
  return all;
}

const Target& target(const std::string& name) {
  std::string names;
  for (const auto& t : targets()) {
    if (t.name == name) return t;
    names += (names.empty() ? "" : ", ") + t.name;
  }
  throw std::invalid_argument("no fuzz target \"" + name + "\" (targets: " + names + ")");
}

const std::vector<Seed>& seeds(const Target& target) {
  static std::map<std::string, std::vector<Seed>> made;
  auto it = made.find(target.name);
  if (it == made.end()) it = made.emplace(target.name, target.make_seeds()).first;
  return it->second;
}

bool is_text(const Seed& seed) {
  const auto ext = fs::path(seed.file).extension();
  return ext == ".json" || ext == ".yaml";
}

Outcome run_one(const Target& target, const Seed& seed, const std::string& bytes,
                const fs::path& dir) {
  for (const auto& [name, b] : seed.companions) put(dir / name, b);
  put(dir / seed.file, bytes);
  const auto before = files_under(dir);
  Outcome out;
  try {
    target.parse(dir, seed.file);
    out.accepted = true;
  } catch (const Error& e) {
    out.error = e.what();
    // One line per problem (a recipe reports each of its problems), each naming the file.
    std::istringstream lines(out.error);
    for (std::string line; std::getline(lines, line);) {
      if (line.find(dir.string()) == std::string::npos)
        out.problem = "an error line names no file: " + line;
      for (const char* word : kJargon)  // (a name quoted from the input may hold anything)
        if (line.find(word) != std::string::npos && bytes.find(word) == std::string::npos)
          out.problem = std::string("the error says ") + word;
    }
  } catch (const std::exception& e) {
    out.problem = std::string("not a graft error: ") + e.what();
  }
  if (out.problem.empty() && files_under(dir) != before) out.problem = "it wrote into the folder";
  if (!out.problem.empty() && !out.error.empty()) out.problem += ": " + out.error;
  for (const auto& entry : fs::directory_iterator(dir)) fs::remove_all(entry.path());
  return out;
}

namespace {

std::uint64_t next(std::uint64_t& s) {  // splitmix64: the same numbers on every machine
  std::uint64_t z = (s += 0x9E3779B97F4A7C15ull);
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}

std::size_t below(std::uint64_t& s, std::size_t n) { return n ? next(s) % n : 0; }

const std::int64_t kBoundaries[] = {
    0,          1,          -1,         2,          255,       256,       65535,   65536,
    2147483647, 2147483648, 4294967295, 4294967296, INT64_MAX, INT64_MIN, 1 << 20, -2147483648LL};

const char* const kNumbers[] = {"0",           "-1",         "1e999", "NaN",
                                "-0",          "2147483648", "1.5",   "99999999999999999999",
                                "-2147483649", "3",          ".inf",  "1e-45"};

// Token-level edits of JSON or YAML text.
std::string mutate_text(std::string t, std::uint64_t& s) {
  switch (below(s, 5)) {
    case 0: {  // a number becomes a boundary value
      std::vector<std::pair<std::size_t, std::size_t>> numbers;
      for (std::size_t i = 0; i < t.size();) {
        if (std::isdigit(static_cast<unsigned char>(t[i]))) {
          std::size_t j = i;
          while (j < t.size() && (std::isdigit(static_cast<unsigned char>(t[j])) || t[j] == '.' ||
                                  t[j] == 'e' || t[j] == '-'))
            ++j;
          numbers.emplace_back(i, j - i);
          i = j;
        } else {
          ++i;
        }
      }
      if (numbers.empty()) return t;
      const auto [at, len] = numbers[below(s, numbers.size())];
      return t.replace(at, len, kNumbers[below(s, std::size(kNumbers))]);
    }
    case 1: {  // a quoted string emptied, lengthened or turned into a path outside
      std::vector<std::size_t> quotes;
      for (std::size_t i = 0; i < t.size(); ++i)
        if (t[i] == '"') quotes.push_back(i);
      if (quotes.size() < 2) return t;
      const auto k = below(s, quotes.size() - 1);
      const auto a = quotes[k] + 1, b = quotes[k + 1];
      const char* const with[] = {"",  "../../../etc/passwd",      "/dev/zero", "\\u0000",
                                  "*", "layers.99999999999.attn.q"};
      const auto pick = below(s, std::size(with) + 1);
      return t.replace(a, b - a,
                       pick < std::size(with) ? std::string(with[pick]) : std::string(4096, 'x'));
    }
    default: {  // a line deleted, repeated or swapped with another
      std::vector<std::string> lines;
      std::stringstream ss(t);
      for (std::string l; std::getline(ss, l);) lines.push_back(l);
      if (lines.empty()) return t;
      const auto i = below(s, lines.size()), j = below(s, lines.size());
      const auto op = below(s, 3);
      if (op == 0)
        lines.erase(lines.begin() + static_cast<std::ptrdiff_t>(i));
      else if (op == 1)
        lines.insert(lines.begin() + static_cast<std::ptrdiff_t>(i), lines[j]);
      else
        std::swap(lines[i], lines[j]);
      std::string out;
      for (const auto& l : lines) out += l + "\n";
      return out;
    }
  }
}

}  // namespace

std::string mutate(const std::string& bytes, std::uint64_t& s, bool text) {
  std::string t = bytes;
  const auto edits = 1 + below(s, 3);
  for (std::size_t e = 0; e < edits; ++e) {
    if (text && below(s, 2) == 0) {
      t = mutate_text(std::move(t), s);
      continue;
    }
    const auto n = t.size();
    switch (below(s, 7)) {
      case 0:  // a bit flipped
        if (n) t[below(s, n)] ^= static_cast<char>(1u << below(s, 8));
        break;
      case 1: {  // an integer at a boundary, 4 or 8 bytes little-endian
        if (n < 8) break;
        const auto v = kBoundaries[below(s, std::size(kBoundaries))];
        const auto width = below(s, 2) ? 8u : 4u;
        const auto at = below(s, n - width + 1);
        for (unsigned k = 0; k < width; ++k) t[at + k] = static_cast<char>((v >> (8 * k)) & 0xff);
        break;
      }
      case 2:  // truncated
        t.resize(below(s, n + 1));
        break;
      case 3: {  // a range deleted
        const auto at = below(s, n + 1);
        t.erase(at, below(s, std::min<std::size_t>(64, n - at) + 1));
        break;
      }
      case 4: {  // a range repeated
        if (!n) break;
        const auto at = below(s, n);
        const auto len = 1 + below(s, std::min<std::size_t>(64, n - at));
        t.insert(below(s, n + 1), t.substr(at, len));
        break;
      }
      case 5: {  // random bytes inserted
        std::string junk(1 + below(s, 16), '\0');
        for (auto& c : junk) c = static_cast<char>(next(s));
        t.insert(below(s, n + 1), junk);
        break;
      }
      default:  // a byte set to a boundary value
        if (n) t[below(s, n)] = "\x00\x01\x7f\x80\xff"[below(s, 5)];
        break;
    }
  }
  return t;
}

std::string encode_input(std::size_t seed_index, const std::string& bytes) {
  return std::string(1, static_cast<char>(seed_index)) + bytes;
}

std::pair<std::size_t, std::string> decode_input(const Target& target, const std::uint8_t* data,
                                                 std::size_t size) {
  const auto n = seeds(target).size();
  if (size == 0) return {0, {}};
  return {data[0] % n, std::string(reinterpret_cast<const char*>(data) + 1, size - 1)};
}

}  // namespace graft::fuzz
