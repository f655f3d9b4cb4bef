// Writing models: Hugging Face folders and GGUF files, for merged adapters.
#include <graft/error.h>
#include <graft/io/gguf.h>
#include <graft/io/safetensors.h>
#include <graft/load.h>
#include <torch/torch.h>

#include <random>
#include <set>

#include "models/families.h"
#include "util/file.h"

namespace graft {
namespace fs = std::filesystem;

namespace {

// The model's parameters on the CPU; with a dtype, floating tensors (of at least `min_dim`
// dimensions) converted to it.
io::TensorMap parameters_of(const Model& model, c10::ScalarType dtype, std::int64_t min_dim = 0) {
  if (dtype != c10::ScalarType::Undefined && dtype != torch::kFloat && dtype != torch::kHalf &&
      dtype != torch::kBFloat16)
    throw Error(std::string("cannot write a model as ") + c10::toString(dtype) +
                " (float32, float16 or bfloat16)");
  io::TensorMap t;
  for (const auto& p : model.named_parameters(true)) {
    auto v = p.value().detach().to(torch::kCPU);
    if (dtype != c10::ScalarType::Undefined && v.is_floating_point())
      v = v.to(v.dim() >= min_dim ? dtype : torch::kFloat);
    t[p.key()] = v.contiguous();
  }
  return t;
}

// llama.cpp takes the number of tokens as the embedding's height. A model with more rows than its
// tokenizer has tokens (padded for speed, as many are) gets the rest as unused tokens named
// "[PAD<id>]", as llama.cpp's converter writes them; fewer rows than tokens cannot be written.
void pad_vocabulary(std::vector<std::pair<std::string, io::GgufValue>>& vocab, std::int64_t rows,
                    const fs::path& file) {
  io::GgufValue* tokens = nullptr;
  for (auto& [k, v] : vocab)
    if (k == "tokenizer.ggml.tokens") tokens = &v;
  if (!tokens) return;
  const auto n = static_cast<std::int64_t>(tokens->array.size());
  if (n > rows)
    throw FileError(file.string(), "the tokenizer has " + std::to_string(n) +
                                       " tokens but the model's embedding only " +
                                       std::to_string(rows) + " rows");
  for (auto& [k, v] : vocab) {
    for (auto id = n; id < rows; ++id) {
      if (k == "tokenizer.ggml.tokens")
        v.array.push_back(io::gguf_string("[PAD" + std::to_string(id) + "]"));
      if (k == "tokenizer.ggml.token_type") v.array.push_back(io::gguf_int(5, v.element_type));
      if (k == "tokenizer.ggml.scores") v.array.push_back(io::gguf_float(-1e9, v.element_type));
    }
  }
}

void check_empty_target(const fs::path& p) {
  if (fs::exists(p) && !(fs::is_directory(p) && fs::is_empty(p)))
    throw FileError(p.string(), "already exists; choose a new output path");
}

}  // namespace

void save_hf_model(const Model& model, const fs::path& out, const fs::path& source,
                   c10::ScalarType dtype) {
  const fs::path dir = out.has_filename() ? out : out.parent_path();  // "merged/" is "merged"
  check_empty_target(dir);
  const auto& c = model.config();
  auto tensors = models::to_hf(c, parameters_of(model, dtype));
  auto config = models::hf_config(c);
  // transformers' torch_dtype: what the matrices are stored as.
  for (const auto& [name, t] : tensors)
    if (t.dim() >= 2 && t.is_floating_point()) {
      config["torch_dtype"] = t.scalar_type() == torch::kHalf       ? "float16"
                              : t.scalar_type() == torch::kBFloat16 ? "bfloat16"
                                                                    : "float32";
      break;
    }
  std::random_device rd;
  fs::path tmp = dir;
  tmp += ".tmp-" + std::to_string(rd());
  try {
    fs::create_directories(tmp);
    io::write_safetensors_model(tmp, tensors, std::int64_t{5} << 30, {{"format", "pt"}});
    io::write_atomically(tmp / "config.json",
                         [&](std::ostream& o) { o << config.dump(2) << "\n"; });
    if (!source.empty() && fs::is_directory(source))
      for (const char* f :
           {"tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt",
            "vocab.json", "merges.txt", "tokenizer.model", "generation_config.json"})
        if (fs::exists(source / f)) fs::copy_file(source / f, tmp / f);
    // A model from a GGUF file: its embedded tokenizer, converted, where it has a faithful form.
    if (!fs::exists(tmp / "tokenizer.json") && model.tokenizer()) {
      std::vector<std::pair<std::string, std::string>> files;
      try {
        files = model.tokenizer()->hf_files();
      } catch (const Error&) {
      }
      for (const auto& [name, text] : files)
        io::write_atomically(tmp / name, [&](std::ostream& o) { o << text; });
    }
    if (fs::exists(dir)) fs::remove(dir);  // an empty folder
    fs::rename(tmp, dir);
  } catch (...) {
    std::error_code ec;
    fs::remove_all(tmp, ec);
    throw;
  }
}

void save_gguf_model(const Model& model, const fs::path& file, const fs::path& source,
                     c10::ScalarType dtype, bool q8_0) {
  check_empty_target(file);
  const auto& c = model.config();
  auto tensors = models::to_gguf(c, parameters_of(model, dtype, 2));
  const std::string arch = c.architecture.rfind("Qwen2", 0) == 0 ? "qwen2" : "llama";
  std::vector<std::pair<std::string, io::GgufValue>> meta = {
      {"general.architecture", io::gguf_string(arch)},
      {arch + ".context_length", io::gguf_int(c.max_positions)},
      {arch + ".embedding_length", io::gguf_int(c.hidden_size)},
      {arch + ".block_count", io::gguf_int(c.num_layers)},
      {arch + ".feed_forward_length", io::gguf_int(c.intermediate_size)},
      {arch + ".attention.head_count", io::gguf_int(c.num_heads)},
      {arch + ".attention.head_count_kv", io::gguf_int(c.num_kv_heads)},
      {arch + ".attention.layer_norm_rms_epsilon", io::gguf_float(c.norm_eps)},
      {arch + ".rope.freq_base", io::gguf_float(c.rope_theta)},
      {arch + ".rope.dimension_count", io::gguf_int(c.head_dim)},
  };
  if (c.sliding_window > 0)
    meta.push_back({arch + ".attention.sliding_window", io::gguf_int(c.sliding_window)});
  // llama.cpp loads no GGUF model without its tokenizer: the model's own, in llama.cpp's keys.
  if (!model.tokenizer())
    throw FileError(file.string(),
                    "the model carries no tokenizer, and llama.cpp loads no GGUF model without "
                    "one (merge from a GGUF file or a folder with tokenizer.json)");
  std::vector<std::pair<std::string, io::GgufValue>> vocab;
  try {
    vocab = model.tokenizer()->gguf_metadata();
  } catch (const FileError&) {
    throw;
  } catch (const Error& e) {
    throw FileError(file.string(), std::string("cannot write the model's tokenizer: ") + e.what());
  }
  pad_vocabulary(vocab, c.vocab_size, file);
  for (auto& kv : vocab) meta.push_back(std::move(kv));
  if (!source.empty() && fs::is_regular_file(source) && source.extension() == ".gguf") {
    io::GgufFile src(source);
    for (const auto& [k, v] : src.metadata())
      if (k.rfind("general.", 0) == 0 && k != "general.architecture" && k != "general.alignment" &&
          k != "general.file_type")
        meta.emplace_back(k, v);
  }
  std::set<std::string> quantised;
  if (q8_0)
    for (const auto& [name, t] : tensors)
      if (t.dim() == 2 && t.size(-1) % 32 == 0) quantised.insert(name);
  // llama.cpp's llama_ftype: what most matrices are (ALL_F32 0, MOSTLY_F16 1, MOSTLY_Q8_0 7,
  // MOSTLY_BF16 32).
  const auto matrices = tensors.at("token_embd.weight").scalar_type();
  meta.push_back({"general.file_type", io::gguf_int(q8_0                           ? 7
                                                    : matrices == torch::kHalf     ? 1
                                                    : matrices == torch::kBFloat16 ? 32
                                                                                   : 0)});
  io::write_gguf(file, meta, tensors, 32, quantised);
}

}  // namespace graft
