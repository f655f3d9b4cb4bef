// graft merge and graft export-adapter.
#include <graft/adapter.h>
#include <graft/io/gguf.h>
#include <graft/load.h>
#include <torch/torch.h>

#include <iostream>
#include <map>
#include <set>

#include "cli/options.h"

namespace graft::cli {

int run_merge(const Args& args) {
  po::options_description desc("options");
  desc.add_options()("model,m", po::value<std::string>()->required(),
                     "base model (GGUF file, folder or name)")(
      "adapter", po::value<std::vector<std::string>>()->required(), "adapter folder (repeatable)")(
      "out,o", po::value<std::string>()->required(), "output: a folder, or a .gguf file")(
      "format", po::value<std::string>(), "hf or gguf (default: gguf when --out ends in .gguf)")(
      "dtype", po::value<std::string>(),
      "f32, f16, bf16, or q8_0 for GGUF: the written matrices' type (default: the model's; GGUF "
      "vectors stay f32)");
  po::variables_map vm;
  if (!parse(args, desc, vm, "usage: graft merge --model M --adapter DIR --out OUT")) return 0;
  const std::string out = vm["out"].as<std::string>();
  std::string format = vm.count("format")
                           ? vm["format"].as<std::string>()
                           : (std::filesystem::path(out).extension() == ".gguf" ? "gguf" : "hf");
  if (format != "hf" && format != "gguf")
    throw UsageError("--format: expected hf or gguf, got \"" + format + "\"");
  auto dtype = c10::ScalarType::Undefined;
  bool q8_0 = false;
  if (vm.count("dtype")) {
    const auto d = vm["dtype"].as<std::string>();
    if (d == "f32")
      dtype = torch::kFloat;
    else if (d == "f16")
      dtype = torch::kHalf;
    else if (d == "bf16")
      dtype = torch::kBFloat16;
    else if (d == "q8_0" && format == "gguf")
      q8_0 = true;
    else if (d == "q8_0")
      throw UsageError("--dtype q8_0: a GGUF type; a Hugging Face folder holds f32, f16 or bf16");
    else
      throw UsageError("--dtype: expected f32, f16, bf16 or q8_0, got \"" + d + "\"");
  }
  if (std::filesystem::exists(out) &&
      !(std::filesystem::is_directory(out) && std::filesystem::is_empty(out)))
    throw UsageError("--out " + out + ": already exists; choose a new output path");
  set_threads(vm["threads"].as<int>());
  auto loaded = load_model(vm["model"].as<std::string>());
  if (format == "gguf" && loaded.model->config().family != "llama")
    throw UsageError("--format gguf: GGUF output is for llama-family models; this is " +
                     loaded.model->config().family + " (write a Hugging Face folder instead)");
  auto methods = apply_adapters(vm, *loaded.model);
  for (auto& m : methods) m->merge(*loaded.model);
  if (format == "gguf") {
    save_gguf_model(*loaded.model, out,
                    loaded.format == "gguf" ? loaded.path : std::filesystem::path(), dtype, q8_0);
  } else {
    save_hf_model(*loaded.model, out, loaded.format == "hf" ? loaded.path : std::filesystem::path(),
                  dtype);
  }
  std::string what = " (Hugging Face folder)";
  if (format == "gguf") {  // what each tensor was written as, read back from the file
    std::map<std::string, int> types;
    const io::GgufFile written(out);  // named: a temporary's tensors() would dangle in the loop
    for (const auto& t : written.tensors()) ++types[io::ggml_type_name(t.type)];
    what.clear();
    for (const auto& [type, n] : types)
      what += (what.empty() ? " (GGUF: " : ", ") + std::to_string(n) + " " + type;
    what += " tensors)";
  }
  std::cout << "merged " << methods.size() << " method(s) into " << loaded.path.string()
            << "; wrote " << out << what << "\n";
  if (format == "hf" && !std::filesystem::exists(std::filesystem::path(out) / "tokenizer.json"))
    std::cout << "note: the model's tokenizer has no Hugging Face form graft writes; the folder "
                 "has no tokenizer.json\n";
  return 0;
}

int run_export_adapter(const Args& args) {
  po::options_description desc("options");
  desc.add_options()("model,m", po::value<std::string>()->required(),
                     "the base model the adapter belongs to")(
      "adapter", po::value<std::vector<std::string>>()->required(), "adapter folder")(
      "format", po::value<std::string>()->required(),
      "graft or a format a plugin registers (peft, gguf, adapters, ...)")(
      "out,o", po::value<std::string>()->required(), "output folder (peft, graft) or .gguf file")(
      "method", po::value<std::vector<std::string>>(),
      "export only the methods of this name (repeatable; default: all the adapter holds)");
  po::variables_map vm;
  if (!parse(args, desc, vm,
             "usage: graft export-adapter --model M --adapter DIR --format "
             "peft|gguf|adapters|graft --out OUT"))
    return 0;
  const std::string out = vm["out"].as<std::string>();
  if (std::filesystem::exists(out) &&
      !(std::filesystem::is_directory(out) && std::filesystem::is_empty(out)))
    throw UsageError("--out " + out + ": already exists; choose a new output path");
  set_threads(vm["threads"].as<int>());
  auto loaded = load_model(vm["model"].as<std::string>());
  auto methods = apply_adapters(vm, *loaded.model);
  std::vector<Method*> chosen;
  std::set<std::string> named;
  if (vm.count("method"))
    for (const auto& n : vm["method"].as<std::vector<std::string>>()) named.insert(n);
  std::string held;
  for (auto& m : methods) {
    held += (held.empty() ? "" : ", ") + m->name();
    if (named.empty() || named.count(m->name())) chosen.push_back(m.get());
  }
  for (const auto& n : named) {
    bool found = false;
    for (auto* m : chosen) found |= m->name() == n;
    if (!found) throw UsageError("--method " + n + ": the adapter holds " + held);
  }
  save_adapter_as(vm["format"].as<std::string>(), out, *loaded.model, chosen);
  std::cout << "wrote " << out << " (" << vm["format"].as<std::string>() << ")\n";
  return 0;
}

}  // namespace graft::cli
