// graft merge and graft export-adapter.
#include <graft/adapter.h>
#include <graft/io/gguf.h>
#include <graft/load.h>
#include <torch/torch.h>

#include <cmath>
#include <iostream>
#include <map>
#include <set>
#include <sstream>

#include "cli/options.h"

namespace graft::cli {

namespace {

// --out must name a new path (or an empty folder): graft never writes over what is there.
void refuse_existing_output(const std::string& out) {
  if (std::filesystem::exists(out) &&
      !(std::filesystem::is_directory(out) && std::filesystem::is_empty(out)))
    throw UsageError("--out " + out + ": already exists; choose a new output path");
}

}  // namespace

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
  refuse_existing_output(out);
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
  refuse_existing_output(out);
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

int run_combine(const Args& args) {
  po::options_description desc("options");
  desc.add_options()("model,m", po::value<std::string>()->required(),
                     "the base model the adapters belong to")(
      "adapter", po::value<std::vector<std::string>>()->required(),
      "an adapter to combine (repeat, two or more; any format graft reads)")(
      "weights,w", po::value<std::string>()->required(), "one weight per --adapter: 0.7,0.4")(
      "type", po::value<std::string>()->required(),
      "linear, cat, svd, ties, magnitude_prune, dare_linear or dare_ties (see graft methods NAME)")(
      "density", po::value<double>()->default_value(1.0),
      "ties, magnitude_prune, dare: the share of each source's entries kept")(
      "majority-sign", po::value<std::string>()->default_value("total"),
      "ties: elect the sign of the sum (total) or of the count (frequency)")(
      "svd-rank", po::value<std::int64_t>()->default_value(0),
      "svd: the new rank (0: the largest source rank)")(
      "svd-clamp", po::value<double>()->default_value(0.0),
      "svd: clamp the factors at this quantile of their entries (0: no clamp)")(
      "seed", po::value<std::uint64_t>()->default_value(0), "dare: the seed of the random masks")(
      "out,o", po::value<std::string>()->required(), "the new adapter folder (graft format)");
  po::variables_map vm;
  if (!parse(args, desc, vm,
             "usage: graft combine --model M --adapter A --adapter B --weights 0.7,0.4 --type "
             "svd --out DIR\n"
             "Makes one adapter from several (peft's add_weighted_adapter), in graft's format."))
    return 0;
  const std::string out = vm["out"].as<std::string>();
  refuse_existing_output(out);
  CombineOptions o;
  o.type = vm["type"].as<std::string>();
  o.density = vm["density"].as<double>();
  o.majority_sign = vm["majority-sign"].as<std::string>();
  o.svd_rank = vm["svd-rank"].as<std::int64_t>();
  o.svd_clamp = vm["svd-clamp"].as<double>();
  o.seed = vm["seed"].as<std::uint64_t>();
  {
    std::stringstream ss(vm["weights"].as<std::string>());
    std::string item;
    while (std::getline(ss, item, ',')) {
      std::size_t used = 0;
      double w = 0;
      try {
        w = std::stod(item, &used);
      } catch (const std::exception&) {
        used = 0;
      }
      if (used == 0 || used != item.size() || !std::isfinite(w))
        throw UsageError("--weights: expected comma-separated numbers, got \"" +
                         vm["weights"].as<std::string>() + "\"");
      o.weights.push_back(w);
    }
  }
  std::vector<std::filesystem::path> sources;
  for (const auto& a : adapter_args(vm)) sources.emplace_back(a.path);
  if (o.weights.size() != sources.size())
    throw UsageError("--weights: " + std::to_string(o.weights.size()) + " weights for " +
                     std::to_string(sources.size()) + " --adapter folders; give one each");
  set_threads(vm["threads"].as<int>());
  auto loaded = load_model(vm["model"].as<std::string>());
  load_cli_plugins(vm);
  const auto method = combine_adapters(sources, o, *loaded.model);
  save_adapter(out, *loaded.model, {method.get()});
  std::cout << "wrote " << out << ": one " << method->name() << " adapter from " << sources.size()
            << " (" << o.type << ")\n";
  return 0;
}

}  // namespace graft::cli
