#include <dlfcn.h>
#include <graft/error.h>
#include <graft/io/gguf.h>
#include <graft/io/json.h>
#include <graft/io/safetensors.h>
#include <graft/load.h>
#include <sched.h>
#include <torch/torch.h>
#include <unistd.h>

#include <cstdlib>
#include <nlohmann/json.hpp>
#include <sstream>
#include <thread>

#include "build_config.h"
#include "models/common.h"
#include "models/families.h"
#include "util/file.h"

namespace graft {
namespace fs = std::filesystem;

std::vector<fs::path> model_search_path() {
  return io::search_path({}, "GRAFT_MODELS",
                         {fs::path(GRAFT_DEFAULT_SHARED_DIR) / "models",
                          fs::path(GRAFT_SOURCE_MODELS_DIR), fs::path("models")});
}

namespace {

// A folder is a model when it holds config.json or exactly one .gguf file.
fs::path model_in_folder(const fs::path& dir) {
  if (fs::exists(dir / "config.json")) return dir;
  std::vector<fs::path> ggufs;
  for (const auto& e : fs::directory_iterator(dir))
    if (e.path().extension() == ".gguf") ggufs.push_back(e.path());
  if (ggufs.size() == 1) return ggufs[0];
  if (ggufs.empty())
    throw Error(dir.string() + ": not a model folder (no config.json and no .gguf file)");
  throw Error(dir.string() + ": holds several .gguf files; name the one to use");
}

// tokenizer_config.json's chat_template: a string, or a list of {name, template} of which the
// one named "default" is what transformers applies.
std::string chat_template_of(const fs::path& config) {
  if (!fs::exists(config)) return "";
  const nlohmann::json j = io::read_json_file(config);
  if (!j.is_object() || !j.contains("chat_template") || j["chat_template"].is_null()) return "";
  const auto& t = j["chat_template"];
  if (t.is_string()) return t.get<std::string>();
  if (t.is_array()) {
    for (const auto& e : t)
      if (e.is_object() && e.value("name", "") == "default" && e.contains("template") &&
          e["template"].is_string())
        return e["template"].get<std::string>();
    return "";
  }
  throw FileError(config.string(), "chat_template: expected a string or a list of templates");
}

}  // namespace

fs::path resolve_model(const std::string& arg) {
  if (fs::exists(arg)) return fs::is_directory(arg) ? model_in_folder(arg) : fs::path(arg);
  std::vector<std::string> looked;
  for (const auto& dir : model_search_path()) {
    if (fs::is_directory(dir / arg)) return model_in_folder(dir / arg);
    if (fs::exists(dir / (arg + ".gguf"))) return dir / (arg + ".gguf");
    looked.push_back(fs::absolute(dir).lexically_normal().string());
  }
  std::string where;
  for (const auto& l : looked) where += (where.empty() ? "" : ", ") + l;
  throw Error("model '" + arg + "' not found: looked for " + arg + "/ and " + arg + ".gguf in " +
              where + "; put it in " + fs::path(GRAFT_SOURCE_MODELS_DIR).string() +
              " (README.md says where the default model comes from), give a path to a .gguf "
              "file or a Hugging Face folder, or set GRAFT_MODELS to the folder that holds it");
}

namespace {

LoadedModel read_model(LoadedModel out, const LoadOptions& options) {
  const std::string where = out.path.string();
  io::TensorMap tensors;
  ModelConfig config;
  if (fs::is_directory(out.path)) {
    out.format = "hf";
    const auto config_path = out.path / "config.json";
    const nlohmann::json j = io::read_json_file(config_path);
    config = models::config_from_hf(j, config_path.string());
    config.name_or_path = j.is_object() && j.contains("_name_or_path") &&
                                  j["_name_or_path"].is_string() &&
                                  !j["_name_or_path"].get<std::string>().empty()
                              ? j["_name_or_path"].get<std::string>()
                              : fs::absolute(out.path).string();
    tensors = models::from_hf(config, io::read_safetensors_model(out.path));
    if (fs::exists(out.path / "tokenizer.json"))
      out.tokenizer = load_tokenizer_json(out.path / "tokenizer.json");
    out.chat_template = chat_template_of(out.path / "tokenizer_config.json");
  } else {
    out.format = "gguf";
    io::GgufFile file(out.path);
    config = models::config_from_gguf(file);
    config.name_or_path = fs::absolute(out.path).string();
    tensors = models::from_gguf(config, file.load_all());
    // llama2.c exports write the shared classifier out as a separate, identical output.weight;
    // tie it again so that the model has the parameters it was trained with.
    auto head = tensors.find("head.weight");
    if (head != tensors.end() && torch::equal(head->second, tensors.at("embed.weight"))) {
      config.tie_embeddings = true;
      tensors.erase(head);
    }
    if (file.find("tokenizer.ggml.model")) out.tokenizer = tokenizer_from_gguf(file);
    if (auto* t = file.find("tokenizer.chat_template"))
      out.chat_template = t->as_string("tokenizer.chat_template");
  }
  if (!options.family.empty() && options.family != config.family)
    throw FileError(where, "is a " + config.family + " model, but the family \"" + options.family +
                               "\" was asked for");
  out.model = models::make_model(config);
  models::load_parameters(*out.model, tensors, where);
  out.model->to(options.device, options.dtype);
  out.model->eval();
  for (auto& p : out.model->parameters()) p.set_requires_grad(false);
  out.model->set_tokenizer(out.tokenizer);
  return out;
}

}  // namespace

LoadedModel load_model(const std::string& arg, const LoadOptions& options) {
  LoadedModel out;
  out.path = resolve_model(arg);
  const auto where = out.path.string();
  try {
    return read_model(std::move(out), options);
  } catch (const FileError&) {
    throw;
  } catch (const SystemError&) {
    throw;
  } catch (const Error& e) {  // a reader that knows the value, not the file: name the file
    throw FileError(where, e.what());
  }
}

std::shared_ptr<Model> make_model(const ModelConfig& config) { return models::make_model(config); }

void init_random(Model& model, std::uint64_t seed, double std) {
  models::init_parameters(model, seed, std);
}

void wait_passively(char** argv) {
  if (std::getenv("OMP_WAIT_POLICY")) return;
  setenv("OMP_WAIT_POLICY", "PASSIVE", 1);
  execv("/proc/self/exe", argv);  // returns only when it cannot: run on as we are
}

int available_cores() {
  cpu_set_t set;
  if (sched_getaffinity(0, sizeof set, &set) == 0) return std::max(1, CPU_COUNT(&set));
  return static_cast<int>(std::max(1u, std::thread::hardware_concurrency()));
}

void set_threads(int threads) {
  const int cores = available_cores();
  if (threads > cores)
    throw Error("threads: " + std::to_string(threads) + " is more than this machine's " +
                std::to_string(cores) + " cores");
  if (threads <= 0) threads = cores;
  torch::set_num_threads(threads);
  // OpenBLAS keeps a pool of its own, whose threads spin while they wait; beside libtorch's
  // they oversubscribe the cores (a 3x slower run on an idle 2-core machine, docs/performance.md).
  // Looked up at run time: the BLAS libtorch was linked with may be another. A user who sets
  // OPENBLAS_NUM_THREADS gets what they asked for.
  using SetThreads = void (*)(int);
  if (std::getenv("OPENBLAS_NUM_THREADS")) return;
  if (auto set = reinterpret_cast<SetThreads>(dlsym(RTLD_DEFAULT, "openblas_set_num_threads")))
    set(1);
}

}  // namespace graft
