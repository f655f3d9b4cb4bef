// graft generate, graft inspect, graft forward.
#include <graft/adapter.h>
#include <graft/generate.h>
#include <graft/io/file.h>
#include <graft/io/gguf.h>
#include <graft/io/safetensors.h>
#include <graft/load.h>
#include <graft/plugin.h>
#include <graft/task_head.h>
#include <torch/torch.h>

#include <algorithm>
#include <cctype>
#include <cmath>
#include <filesystem>
#include <iomanip>
#include <iostream>
#include <map>
#include <sstream>

#include "cli/options.h"

namespace graft::cli {

std::vector<std::int64_t> parse_int_list(const std::string& text, const std::string& what) {
  std::vector<std::int64_t> out;
  std::stringstream ss(text);
  std::string item;
  while (std::getline(ss, item, ',')) {
    try {
      std::size_t used = 0;
      out.push_back(std::stoll(item, &used));
      if (used != item.size()) throw std::invalid_argument(item);
    } catch (const std::exception&) {
      throw UsageError(what + ": expected comma-separated integers, got \"" + text + "\"");
    }
  }
  if (out.empty()) throw UsageError(what + ": expected at least one integer");
  return out;
}

void load_cli_plugins(const po::variables_map& vm) {
  std::vector<std::filesystem::path> extra;
  if (vm.count("plugin-dir"))
    for (const auto& d : vm["plugin-dir"].as<std::vector<std::string>>()) {
      if (!std::filesystem::is_directory(d))
        throw UsageError("--plugin-dir " + d + ": not a folder");
      extra.emplace_back(d);
    }
  load_plugins(extra);
}

std::vector<AdapterArg> adapter_args(const po::variables_map& vm) {
  std::vector<AdapterArg> out;
  if (!vm.count("adapter")) return out;
  for (const auto& value : vm["adapter"].as<std::vector<std::string>>()) {
    AdapterArg a;
    try {
      const auto [name, path] = adapter_name_and_path(value);
      a.name = name;
      a.path = path.string();
    } catch (const Error& e) {
      throw UsageError(std::string("--adapter ") + e.what());
    }
    out.push_back(std::move(a));
  }
  return out;
}

namespace {

// The --adapter-scale values: none, one for every adapter, or one per adapter.
std::vector<double> adapter_scales(const po::variables_map& vm, std::size_t adapters) {
  std::vector<double> scales;
  if (vm.count("adapter-scale")) scales = vm["adapter-scale"].as<std::vector<double>>();
  if (scales.size() > 1 && scales.size() != adapters)
    throw UsageError("--adapter-scale: give one value for all adapters or one per --adapter (" +
                     std::to_string(adapters) + "), not " + std::to_string(scales.size()));
  return scales;
}

// Scales a freshly loaded method as --adapter-scale says and prints what it reports.
void prepare(Method& m, const std::vector<double>& scales, std::size_t i) {
  if (!scales.empty()) m.set_scale(scales.size() == 1 ? scales[0] : scales[i]);
  const auto line = m.report();  // e.g. the memory a quantised base saves
  if (!line.empty()) std::cerr << line << "\n";
}

std::vector<std::string> split_names(const std::string& text, const std::string& option) {
  std::vector<std::string> out;
  std::stringstream ss(text);
  std::string item;
  while (std::getline(ss, item, ',')) {
    if (item.empty()) throw UsageError(option + " " + text + ": an empty name between commas");
    out.push_back(item);
  }
  if (out.empty()) throw UsageError(option + ": expected comma-separated adapter names");
  return out;
}

}  // namespace

std::vector<std::unique_ptr<Method>> apply_adapters(const po::variables_map& vm, Model& model) {
  std::vector<std::unique_ptr<Method>> methods;
  const auto args = adapter_args(vm);
  if (args.empty()) return methods;
  load_cli_plugins(vm);
  const auto scales = adapter_scales(vm, args.size());
  for (std::size_t i = 0; i < args.size(); ++i)
    for (auto& m : load_adapter(args[i].path, model)) {
      prepare(*m, scales, i);
      methods.push_back(std::move(m));
    }
  return methods;
}

std::vector<std::string> route_names(const po::variables_map& vm) {
  return vm.count("route") ? split_names(vm["route"].as<std::string>(), "--route")
                           : std::vector<std::string>{};
}

std::unique_ptr<AdapterSet> load_adapter_set(const po::variables_map& vm, Model& model,
                                             std::int64_t rows) {
  auto set = std::make_unique<AdapterSet>(model);
  const auto args = adapter_args(vm);
  if (!args.empty()) load_cli_plugins(vm);
  const auto scales = adapter_scales(vm, args.size());
  for (std::size_t i = 0; i < args.size(); ++i) {
    for (std::size_t j = 0; j < i; ++j)
      if (args[j].name == args[i].name)
        throw UsageError("--adapter " + args[i].path + ": another adapter is named '" +
                         args[i].name + "' already; name them apart with --adapter NAME=PATH");
    set->load(args[i].name, args[i].path);
    for (auto* m : set->methods(args[i].name)) prepare(*m, scales, i);
  }
  if (vm.count("active")) {
    const auto text = vm["active"].as<std::string>();
    set->set_active(text == "none" ? std::vector<std::string>{} : split_names(text, "--active"));
  }
  const auto route = route_names(vm);
  if (!route.empty()) {
    if (static_cast<std::int64_t>(route.size()) != rows)
      throw UsageError("--route names " + std::to_string(route.size()) + " rows; the batch has " +
                       std::to_string(rows));
    set->route(route);
  }
  return set;
}

namespace {

std::string with_commas(std::int64_t n) {
  auto s = std::to_string(n);
  for (int i = static_cast<int>(s.size()) - 3; i > 0; i -= 3) s.insert(i, ",");
  return s;
}

using TensorRows = std::vector<std::tuple<std::string, std::string, std::string>>;

void print_tensors(const TensorRows& rows) {
  std::size_t width = 4;
  for (const auto& r : rows) width = std::max(width, std::get<0>(r).size());
  std::cout << "tensors: " << rows.size() << "\n";
  for (const auto& [name, shape, dtype] : rows)
    std::cout << "  " << std::left << std::setw(static_cast<int>(width)) << name << "  "
              << std::setw(16) << shape << " " << dtype << "\n";
}

// An adapter GGUF (general.type "adapter") holds no model: say what it adapts instead, from its
// own adapter.* keys (which a plugin's format reads).
void describe_gguf_adapter(const io::GgufFile& f) {
  auto text = [&](const char* key) {
    auto* v = f.find(key);
    return v && v->type == io::GgufType::string ? v->s : std::string("?");
  };
  std::cout << "adapter: " << text("adapter.type") << " for the " << text("general.architecture")
            << " architecture\n";
  for (const auto& [k, v] : f.metadata())
    if (k.rfind("adapter.", 0) == 0 && k != "adapter.type")
      std::cout << "  " << k << " = " << v.to_string() << "\n";
}

}  // namespace

int run_generate(const Args& args) {
  po::options_description desc("options");
  desc.add_options()("model,m", po::value<std::string>()->required(),
                     "GGUF file, Hugging Face folder or model name")(
      "prompt,p", po::value<std::string>()->default_value(""), "text to continue")(
      "max-new-tokens,n", po::value<std::int64_t>()->default_value(128), "tokens to generate")(
      "temperature,t", po::value<double>()->default_value(0.0), "0 = greedy")(
      "top-k", po::value<std::int64_t>()->default_value(0),
      "sample from the k most likely (0 = all)")("top-p", po::value<double>()->default_value(1.0),
                                                 "nucleus sampling threshold")(
      "seed", po::value<std::uint64_t>()->default_value(0), "sampling seed")(
      "no-bos", "do not start with the BOS token");
  add_adapter_option(desc);
  add_routing_options(desc);
  po::variables_map vm;
  if (!parse(args, desc, vm,
             "usage: graft generate --model PATH [--prompt TEXT] [options]\n"
             "With --route A,B,base the prompt is continued once per name, all in one batch."))
    return 0;
  GenerationOptions o;
  o.max_new_tokens = vm["max-new-tokens"].as<std::int64_t>();
  o.temperature = vm["temperature"].as<double>();
  o.top_k = vm["top-k"].as<std::int64_t>();
  o.top_p = vm["top-p"].as<double>();
  o.seed = vm["seed"].as<std::uint64_t>();
  if (o.max_new_tokens < 0) throw UsageError("--max-new-tokens: expected a non-negative integer");
  if (!(o.temperature >= 0) || !std::isfinite(o.temperature))
    throw UsageError("--temperature: expected a non-negative number");
  if (!(o.top_p > 0 && o.top_p <= 1)) throw UsageError("--top-p: expected a number in (0, 1]");
  if (o.top_k < 0) throw UsageError("--top-k: expected a non-negative integer (0: all)");

  set_threads(vm["threads"].as<int>());
  auto loaded = load_model(vm["model"].as<std::string>());
  if (!loaded.tokenizer)
    throw Error(loaded.path.string() + ": has no tokenizer to encode the prompt");
  if (!loaded.model->causal())
    throw Error(loaded.path.string() + ": is not a causal language model");
  const auto route = route_names(vm);
  const auto adapters = load_adapter_set(
      vm, *loaded.model, std::max<std::int64_t>(static_cast<std::int64_t>(route.size()), 1));
  const auto& tok = *loaded.tokenizer;
  auto prompt = tok.encode(vm["prompt"].as<std::string>(), !vm.count("no-bos"));
  if (prompt.empty()) throw UsageError("the prompt is empty and the model has no BOS token");
  const auto context = loaded.model->config().max_positions;
  if (context > 0 && static_cast<std::int64_t>(prompt.size()) + o.max_new_tokens > context)
    throw UsageError("--max-new-tokens " + std::to_string(o.max_new_tokens) + ": with the " +
                     std::to_string(prompt.size()) + " tokens of the prompt, beyond the model's " +
                     std::to_string(context) + " positions");
  if (tok.eos_id() >= 0) o.stop_ids.push_back(tok.eos_id());

  auto ids = torch::tensor(prompt, torch::kLong).unsqueeze(0);
  if (!route.empty()) {  // one row per routed name, printed when all are done
    const auto out =
        generate(*loaded.model, ids.repeat({static_cast<std::int64_t>(route.size()), 1}), {}, o);
    for (std::size_t r = 0; r < route.size(); ++r) {
      std::vector<std::int64_t> row = prompt;
      for (std::int64_t t = 0; t < out.size(1); ++t) {
        const auto id = out[static_cast<std::int64_t>(r)][t].item<std::int64_t>();
        if (id < 0) break;
        row.push_back(id);
      }
      std::cout << "[" << route[r] << "] " << tok.decode(row) << "\n";
    }
    return 0;
  }
  std::vector<std::int64_t> all = prompt;
  std::string shown = tok.decode(all);
  std::cout << shown << std::flush;
  generate(*loaded.model, ids, {}, o, [&](const at::Tensor& next) {
    auto id = next[0].item<std::int64_t>();
    if (id < 0) return;
    all.push_back(id);
    // Decode everything so far and print what is new: byte tokens only form characters together.
    auto text = tok.decode(all);
    if (text.size() > shown.size() && text.compare(0, shown.size(), shown) == 0) {
      std::cout << text.substr(shown.size()) << std::flush;
      shown = std::move(text);
    }
  });
  std::cout << "\n";
  return 0;
}

int run_inspect(const Args& args) {
  po::options_description desc("options");
  desc.add_options()("model,m", po::value<std::string>()->required(),
                     "GGUF file, Hugging Face folder or name")("metadata",
                                                               "list every GGUF metadata entry");
  po::positional_options_description pos;
  pos.add("model", 1);
  po::variables_map vm;
  if (!parse(args, desc, vm, "usage: graft inspect PATH [--metadata]", &pos)) return 0;
  const auto path = resolve_model(vm["model"].as<std::string>());
  std::vector<std::tuple<std::string, std::string, std::string>> rows;  // name, shape, dtype
  std::cout << "file: " << path.string();
  if (std::filesystem::is_directory(path)) {
    std::cout << " (Hugging Face folder)\n";
    for (const auto& [name, t] : io::read_safetensors_model(path))
      rows.emplace_back(name, c10::str(t.sizes()), std::string(c10::toString(t.scalar_type())));
  } else {
    io::GgufFile f(path);
    std::cout << " (GGUF v" << f.version() << ", " << f.metadata().size() << " metadata entries)\n";
    if (vm.count("metadata"))
      for (const auto& [k, v] : f.metadata())
        std::cout << "  " << k << " = " << v.to_string() << "\n";
    for (const auto& t : f.tensors())
      rows.emplace_back(t.name, c10::str(c10::IntArrayRef(t.shape)), io::ggml_type_name(t.type));
    if (auto* type = f.find("general.type");
        type && type->type == io::GgufType::string && type->s == "adapter") {
      describe_gguf_adapter(f);
      print_tensors(rows);
      return 0;
    }
  }
  set_threads(vm["threads"].as<int>());
  LoadedModel loaded;
  try {
    loaded = load_model(path.string());
  } catch (const Error& e) {
    // Still a description: what the file holds, and why graft cannot run it.
    std::cout << "graft cannot run this model: " << e.what() << "\n";
    print_tensors(rows);
    return 0;
  }
  const auto& c = loaded.model->config();
  std::int64_t params = 0;
  for (const auto& p : loaded.model->parameters()) params += p.numel();
  std::cout << "family: " << c.family << " (" << c.architecture << ")\n"
            << "config: " << c.to_json().dump() << "\n"
            << "parameters: " << with_commas(params) << "\n"
            << "sites: " << loaded.model->sites().size()
            << " (the points methods attach to, with the layers that have them)\n";
  // One line per point, in the model's order: "attn.q  layers 0-7  64 -> 64".
  std::vector<std::string> points;
  std::map<std::string, std::vector<const Site*>> by_point;
  for (const auto& s : loaded.model->sites()) {
    if (!by_point.count(s.point)) points.push_back(s.point);
    by_point[s.point].push_back(&s);
  }
  for (const auto& point : points) {
    const auto& all = by_point[point];
    std::int64_t lo = -1, hi = -1;
    for (const auto* s : all)
      if (s->layer >= 0) {
        lo = lo < 0 ? s->layer : std::min(lo, s->layer);
        hi = std::max(hi, s->layer);
      }
    std::ostringstream layers;
    if (lo < 0)
      layers << "model";
    else if (lo == hi)
      layers << "layer " << lo;
    else
      layers << "layers " << lo << "-" << hi;
    std::cout << "  " << std::left << std::setw(12) << point << "  " << std::setw(12)
              << layers.str() << "  " << all.front()->in_features << " -> "
              << all.front()->out_features << "\n";
  }
  if (loaded.tokenizer)
    std::cout << "tokenizer: " << loaded.tokenizer->vocab_size() << " tokens (bos "
              << loaded.tokenizer->bos_id() << ", eos " << loaded.tokenizer->eos_id() << ")\n";
  print_tensors(rows);
  return 0;
}

namespace {

// The task head of the --adapter folders (at most one has one), for the model's width.
std::optional<TaskHeadWeights> adapter_task_head(const po::variables_map& vm, const Model& model) {
  std::optional<TaskHeadWeights> head;
  for (const auto& a : adapter_args(vm)) {
    auto h = read_task_head(a.path, model.config().hidden_size);
    if (h && head)
      throw UsageError("more than one --adapter folder holds a " + std::string(kTaskHeadFile));
    if (h) head = std::move(h);
  }
  return head;
}

}  // namespace

int run_classify(const Args& args) {
  po::options_description desc("options");
  desc.add_options()("model,m", po::value<std::string>()->required(),
                     "GGUF file, Hugging Face folder or model name")(
      "text", po::value<std::vector<std::string>>(), "a text to classify (repeatable)")(
      "file", po::value<std::string>(), "a file of texts, one per line")(
      "max-length", po::value<std::int64_t>()->default_value(128),
      "tokens per text, as the recipe's task.max_length (longer texts are cut)");
  add_adapter_option(desc);
  po::variables_map vm;
  if (!parse(args, desc, vm,
             "usage: graft classify --model M [--adapter DIR] (--text T ... | --file F)\n"
             "Prints each text's label and its probability, with the model's classifier or the\n"
             "task head a classification recipe saved beside its adapter."))
    return 0;
  std::vector<std::string> texts;
  if (vm.count("text")) texts = vm["text"].as<std::vector<std::string>>();
  if (vm.count("file")) {
    std::istringstream in(io::read_text_file(vm["file"].as<std::string>()));
    for (std::string line; std::getline(in, line);)
      if (!line.empty()) texts.push_back(line);
  }
  if (texts.empty()) throw UsageError("give --text (repeatable) or --file");
  const auto max_length = vm["max-length"].as<std::int64_t>();
  if (max_length < 2) throw UsageError("--max-length: expected at least 2 tokens");

  set_threads(vm["threads"].as<int>());
  auto loaded = load_model(vm["model"].as<std::string>());
  auto adapters = apply_adapters(vm, *loaded.model);
  const auto head = adapter_task_head(vm, *loaded.model);
  if (!head && !loaded.model->config().num_labels)
    throw UsageError("the model has no classifier and no --adapter folder holds a " +
                     std::string(kTaskHeadFile) +
                     " (train one with a sequence_classification recipe)");
  if (!loaded.tokenizer) throw Error(loaded.path.string() + ": the model carries no tokenizer");
  const auto& tok = *loaded.tokenizer;
  const auto pad = std::max<std::int64_t>(tok.pad_id(), 0);
  torch::NoGradGuard no_grad;
  constexpr std::size_t kBatch = 16;
  for (std::size_t start = 0; start < texts.size(); start += kBatch) {
    const auto n = std::min(kBatch, texts.size() - start);
    std::vector<std::vector<std::int64_t>> ids;
    std::int64_t T = 1;
    for (std::size_t i = 0; i < n; ++i) {
      auto e = tok.encode(texts[start + i], true);
      if (static_cast<std::int64_t>(e.size()) > max_length) e.resize(max_length);
      T = std::max<std::int64_t>(T, static_cast<std::int64_t>(e.size()));
      ids.push_back(std::move(e));
    }
    auto input = torch::full({static_cast<std::int64_t>(n), T}, pad, torch::kLong);
    auto mask = torch::zeros_like(input);
    for (std::size_t i = 0; i < n; ++i)
      for (std::size_t t = 0; t < ids[i].size(); ++t) {
        input[static_cast<std::int64_t>(i)][static_cast<std::int64_t>(t)] = ids[i][t];
        mask[static_cast<std::int64_t>(i)][static_cast<std::int64_t>(t)] = 1;
      }
    auto out = loaded.model->forward({input, mask, {}, {}}, nullptr);
    auto logits =
        head ? head->logits(pooled_for_classification(*loaded.model, out, mask)) : out.logits;
    auto probs = torch::softmax(logits.to(torch::kFloat), -1);
    auto best = probs.argmax(-1);
    for (std::size_t i = 0; i < n; ++i) {
      const auto k = best[static_cast<std::int64_t>(i)].item<std::int64_t>();
      std::cout << k << "\t" << std::fixed << std::setprecision(4)
                << probs[static_cast<std::int64_t>(i)][k].item<float>() << "\t" << texts[start + i]
                << "\n";
    }
  }
  return 0;
}

int run_forward(const Args& args) {
  po::options_description desc("options");
  desc.add_options()("model,m", po::value<std::string>()->required(),
                     "GGUF file, Hugging Face folder or model name")(
      "tokens", po::value<std::vector<std::string>>()->required(),
      "one sequence of comma-separated ids; repeat for a batch")(
      "mask", po::value<std::vector<std::string>>(),
      "attention mask per sequence (1 token, 0 padding)")(
      "token-types", po::value<std::vector<std::string>>(), "token type ids per sequence (bert)")(
      "padding", po::value<std::string>()->default_value("right"),
      "pad shorter sequences on the left or right")("out,o", po::value<std::string>()->required(),
                                                    "output .safetensors file");
  add_adapter_option(desc);
  add_routing_options(desc);
  po::variables_map vm;
  if (!parse(
          args, desc, vm,
          "usage: graft forward --model PATH --tokens 1,5,9 [--tokens ...] --out FILE.safetensors\n"
          "       [--adapter NAME=DIR ...] [--active NAME,...|none] [--route NAME|base,...]"))
    return 0;
  const auto padding = vm["padding"].as<std::string>();
  if (padding != "left" && padding != "right")
    throw UsageError("--padding: expected left or right");
  std::vector<std::vector<std::int64_t>> seqs, masks, types;
  for (const auto& s : vm["tokens"].as<std::vector<std::string>>())
    seqs.push_back(parse_int_list(s, "--tokens"));
  if (vm.count("mask"))
    for (const auto& s : vm["mask"].as<std::vector<std::string>>())
      masks.push_back(parse_int_list(s, "--mask"));
  if (vm.count("token-types"))
    for (const auto& s : vm["token-types"].as<std::vector<std::string>>())
      types.push_back(parse_int_list(s, "--token-types"));
  if (!masks.empty() && masks.size() != seqs.size())
    throw UsageError("give one --mask per --tokens");
  if (!types.empty() && types.size() != seqs.size())
    throw UsageError("give one --token-types per --tokens");
  for (std::size_t i = 0; i < masks.size(); ++i) {
    if (masks[i].size() != seqs[i].size())
      throw UsageError("--mask " + std::to_string(i + 1) +
                       " has a different length from its --tokens");
    bool any = false;
    for (const auto m : masks[i]) {
      if (m != 0 && m != 1)
        throw UsageError("--mask: expected 0s and 1s, got " + std::to_string(m));
      any |= m == 1;
    }
    if (!any)
      throw UsageError("--mask " + std::to_string(i + 1) +
                       ": every position is masked; a row needs at least one real token");
  }
  for (std::size_t i = 0; i < types.size(); ++i)
    if (types[i].size() != seqs[i].size())
      throw UsageError("--token-types " + std::to_string(i + 1) +
                       " has a different length from its --tokens");

  set_threads(vm["threads"].as<int>());
  auto loaded = load_model(vm["model"].as<std::string>());
  const auto adapters = load_adapter_set(vm, *loaded.model, static_cast<std::int64_t>(seqs.size()));
  const auto vocab = loaded.model->config().vocab_size;
  std::size_t len = 0;
  for (const auto& s : seqs) len = std::max(len, s.size());
  const auto context = loaded.model->config().max_positions;
  if (context > 0 && static_cast<std::int64_t>(len) > context)
    throw UsageError("--tokens: " + std::to_string(len) + " tokens, beyond the model's " +
                     std::to_string(context) + " positions");
  const auto type_vocab = loaded.model->config().type_vocab_size;
  for (const auto& row : types)
    for (const auto t : row)
      if (t < 0 || t >= std::max<std::int64_t>(type_vocab, 1))
        throw UsageError("--token-types: " + std::to_string(t) + " is outside the model's " +
                         std::to_string(std::max<std::int64_t>(type_vocab, 1)) + " token types");
  const auto pad_id = std::max<std::int64_t>(loaded.model->config().pad_token_id, 0);
  const auto batch = static_cast<std::int64_t>(seqs.size());
  auto ids = torch::full({batch, static_cast<std::int64_t>(len)}, pad_id, torch::kLong);
  auto mask = torch::zeros({batch, static_cast<std::int64_t>(len)}, torch::kLong);
  auto tt = torch::zeros({batch, static_cast<std::int64_t>(len)}, torch::kLong);
  for (std::int64_t b = 0; b < batch; ++b) {
    const auto n = static_cast<std::int64_t>(seqs[b].size());
    const std::int64_t off = padding == "left" ? static_cast<std::int64_t>(len) - n : 0;
    for (std::int64_t t = 0; t < n; ++t) {
      if (seqs[b][t] < 0 || seqs[b][t] >= vocab)
        throw UsageError("--tokens: id " + std::to_string(seqs[b][t]) +
                         " is outside the vocabulary of " + std::to_string(vocab));
      ids[b][off + t] = seqs[b][t];
      mask[b][off + t] = masks.empty() ? 1 : masks[b][t];
      if (!types.empty()) tt[b][off + t] = types[b][t];
    }
  }
  torch::NoGradGuard no_grad;
  ForwardInput in{ids, mask, types.empty() ? at::Tensor() : tt, {}};
  auto out = loaded.model->forward(in, nullptr);
  io::TensorMap tensors{
      {"input_ids", ids}, {"attention_mask", mask}, {"hidden", out.hidden.contiguous()}};
  if (out.logits.defined()) tensors["logits"] = out.logits.contiguous();
  if (out.pooled.defined()) tensors["pooled"] = out.pooled.contiguous();
  // A classification adapter's head: its class logits beside the model's own outputs.
  if (const auto head = adapter_task_head(vm, *loaded.model))
    tensors["task_logits"] =
        head->logits(pooled_for_classification(*loaded.model, out, mask)).contiguous();
  io::write_safetensors(
      vm["out"].as<std::string>(), tensors,
      {{"model", loaded.path.string()}, {"family", loaded.model->config().family}});
  std::cout << "wrote " << vm["out"].as<std::string>() << ": logits "
            << (out.logits.defined() ? c10::str(out.logits.sizes()) : std::string("(none)"))
            << ", hidden " << c10::str(out.hidden.sizes()) << "\n";
  return 0;
}

}  // namespace graft::cli

namespace graft::cli {

namespace {

// What a JSON value is, in a recipe's words.
std::string kind_of(const nlohmann::json& v) {
  if (v.is_boolean()) return "boolean";
  if (v.is_number_integer()) return "integer";
  if (v.is_number()) return "number";
  if (v.is_string()) return "string";
  if (v.is_array()) return "list";
  if (v.is_object()) return "map";
  return "-";
}

// One method: its registration, and every key with its type and default, read from the
// configuration a method made with no keys reports (so that every plugin gets this for free).
int describe_method(const RegisteredMethod& m) {
  std::string points;
  for (const auto& p : m.info.points) points += (points.empty() ? "" : ", ") + p;
  std::cout << m.info.name << " " << m.info.version << ": " << m.info.description << "\n"
            << "  plugin:    " << (m.file.empty() ? "(built in)" : m.file.string()) << "\n"
            << "  mergeable: " << (m.info.mergeable ? "yes" : "no") << "\n"
            << "  sites:     " << (points.empty() ? "-" : points) << "\n";
  auto params = Params::map();
  params.set("name", Params::scalar(m.info.name, "name"));
  nlohmann::json config;
  try {
    config = make_method(m.info.name, params)->config();
  } catch (const Error& e) {
    std::cout << "  keys: a method without keys cannot be made (" << e.what()
              << "); see the plugin's README\n";
    return 0;
  }
  config.erase("name");
  std::size_t w = 4;
  for (const auto& [k, v] : config.items()) w = std::max(w, k.size());
  std::cout << "  keys, with the defaults a recipe without them gets:\n";
  for (const auto& [k, v] : config.items())
    std::cout << "    " << std::left << std::setw(static_cast<int>(w)) << k << "  " << std::setw(8)
              << kind_of(v) << "  " << v.dump() << "\n";
  std::string more;
  for (const char* k : {"targets", "layers", "leave_out"})
    if (!config.contains(k)) more += std::string(more.empty() ? "" : ", ") + k;
  std::cout << "  site selection: targets, layers, leave_out (docs/plugins.md)"
            << (more.empty() ? "" : "; unset here: " + more) << "\n";
  return 0;
}

}  // namespace

int run_methods(const Args& args) {
  po::options_description desc("options");
  desc.add_options()("method", po::value<std::string>(), "one method to describe");
  po::positional_options_description pos;
  pos.add("method", 1);
  po::variables_map vm;
  if (!parse(args, desc, vm, "usage: graft methods [NAME] [--plugin-dir DIR]", &pos)) return 0;
  load_cli_plugins(vm);
  auto methods = registered_methods();
  if (vm.count("method")) {
    const auto name = vm["method"].as<std::string>();
    std::vector<std::string> names;
    for (const auto& m : methods) {
      if (m.info.name == name) return describe_method(m);
      names.push_back(m.info.name);
    }
    const auto near = did_you_mean(name, names);
    throw UsageError("no method \"" + name + "\" in the plugins found" +
                     (near.empty() ? "" : " (did you mean \"" + near + "\"?)") +
                     "; graft methods lists them");
  }
  std::size_t w = 6;
  for (const auto& m : methods) w = std::max(w, m.info.name.size());
  std::cout << std::left << std::setw(static_cast<int>(w)) << "method"
            << "  " << std::setw(8) << "version"
            << "  " << std::setw(9) << "mergeable"
            << "  sites / file\n";
  for (const auto& m : methods) {
    std::string points;
    for (const auto& p : m.info.points) points += (points.empty() ? "" : ",") + p;
    std::cout << std::setw(static_cast<int>(w)) << m.info.name << "  " << std::setw(8)
              << m.info.version << "  " << std::setw(9) << (m.info.mergeable ? "yes" : "no") << "  "
              << (points.empty() ? "-" : points) << "\n"
              << std::string(w + 23, ' ') << m.file.string() << "\n";
  }
  if (methods.empty()) {
    std::cout << "(no methods found; searched:";
    for (const auto& d : plugin_search_path()) std::cout << " " << d.string();
    std::cout << ")\n";
  }
  int failed = 0;
  for (const auto& r : load_plugins())
    if (!r.error.empty()) {
      if (!failed++) std::cout << "\nplugins that failed to load:\n";
      std::cout << "  " << r.file.string() << ": " << r.error << "\n";
    }
  return 0;
}

}  // namespace graft::cli
