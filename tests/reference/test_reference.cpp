// The reference suite: cases written and computed by the real transformers, peft and AdapterHub
// libraries (../shared/fixtures/reference, see its README.md). Each case's base model and adapter
// are loaded the way a user loads them (load_model, load_adapter), its inputs are run, and every
// output the case recorded is compared; generations must give the same token ids.
//
// Nothing here knows the shapes, ids or lengths of these files: everything comes from
// manifest.json and the inputs files, so other models of other shapes run the same code.
#include <graft/adapter.h>
#include <graft/adapter_set.h>
#include <graft/generate.h>
#include <graft/io/file.h>
#include <graft/io/safetensors.h>
#include <graft/load.h>
#include <torch/torch.h>

#include <cmath>
#include <cstdlib>
#include <map>
#include <nlohmann/json.hpp>
#include <set>
#include <sstream>

#include "numeric.h"
#include "plugins/method_params.h"
#include "support.h"

namespace fs = std::filesystem;
using nlohmann::json;
using namespace graft;

namespace {

// The cases graft cannot run yet, each with the reason. The suite fails when one of them starts
// to pass, so that this list only shrinks.
const std::map<std::string, std::string>& not_yet() {
  static const std::map<std::string, std::string> cases = {};
  return cases;
}

// The reference folder: $GRAFT_REFERENCE, else fixtures/reference in the shared folder.
fs::path reference_dir() {
  if (const char* env = std::getenv("GRAFT_REFERENCE")) return env;
  return graft::test::shared_dir() / "fixtures" / "reference";
}

json read_json(const fs::path& path) { return json::parse(io::read_text_file(path)); }

at::Tensor tensor_of(const json& rows) {
  std::vector<std::int64_t> flat;
  for (const auto& row : rows)
    for (const auto& v : row) flat.push_back(v.get<std::int64_t>());
  return torch::tensor(flat, torch::kLong).view({static_cast<std::int64_t>(rows.size()), -1});
}

// One model's input batch, as its inputs.json gives it.
struct Inputs {
  at::Tensor ids, mask, compare;  // [batch, seq]
};

Inputs inputs_of(const fs::path& root, const std::string& model) {
  const auto j = read_json(root / model / "inputs.json");
  return {tensor_of(j.at("input_ids")), tensor_of(j.at("attention_mask")),
          tensor_of(j.at("compare_mask"))};
}

// What one comparison found: the worst difference and its bound, or a description of a mismatch.
struct Verdict {
  bool ok = true;
  std::string detail;
  void fail(const std::string& what) {
    ok = false;
    detail += (detail.empty() ? "" : "; ") + what;
  }
};

// Compares `actual` with `expected` where the compare mask allows. Outputs with positions
// ([batch, positions, ...]) may have virtual tokens in front: the mask covers the last `seq`
// positions and the virtual ones are always compared.
void compare(const std::string& key, at::Tensor actual, at::Tensor expected, const Inputs& in,
             double tolerance, Verdict& v) {
  if (!actual.defined()) return v.fail(key + ": graft gives no such output");
  if (actual.sizes() != expected.sizes())
    return v.fail(key + ": shape " + c10::str(actual.sizes()) + ", expected " +
                  c10::str(expected.sizes()));
  auto diff = (actual.to(torch::kDouble) - expected.to(torch::kDouble)).abs();
  if (diff.dim() >= 3) {
    const auto seq = in.compare.size(1), virtual_tokens = diff.size(1) - seq;
    auto mask =
        torch::cat({torch::ones({diff.size(0), virtual_tokens}, torch::kLong), in.compare}, 1)
            .to(torch::kBool);
    while (mask.dim() < diff.dim()) mask = mask.unsqueeze(-1);
    diff = diff.masked_fill(mask.logical_not(), 0.0);
  }
  const double worst = diff.max().item<double>();
  std::ostringstream os;
  os << key << " max diff " << worst << " (bound " << tolerance << ")";
  if (!(worst <= tolerance)) v.fail(os.str());
}

// Greedy generation as the case's generate.safetensors recorded it: one unpadded prompt, then a
// batch with a left-padded row. Token ids must be equal.
void compare_generation(Model& model, const fs::path& file, Verdict& v) {
  const auto g = io::read_safetensors(file.string()).tensors;
  GenerationOptions o;
  o.temperature = 0;
  auto check = [&](const std::string& prompt, const std::string& mask, const std::string& seqs) {
    const auto ids = g.at(prompt).to(torch::kLong);
    const auto expected = g.at(seqs).to(torch::kLong).slice(1, ids.size(1));
    o.max_new_tokens = expected.size(1);
    const auto got = generate(model, ids, mask.empty() ? at::Tensor() : g.at(mask), o);
    if (!torch::equal(got, expected))
      v.fail(seqs + ": generated " + c10::str(got) + ", expected " + c10::str(expected));
  };
  check("prompt_ids", "", "sequences");
  check("batch_prompt_ids", "batch_attention_mask", "batch_sequences");
}

// Runs the case's inputs through `model` and compares every output `file` recorded (names in
// the verdict start with `label`).
void compare_outputs(Model& model, const Inputs& in, const fs::path& file, const std::string& label,
                     Verdict& v) {
  // transformers' plain forward numbers every row's columns 0..S-1, padding included, and peft
  // counts the tokens after its virtual ones: graft's explicit positions mean exactly that.
  ForwardInput fin;
  fin.input_ids = in.ids;
  fin.attention_mask = in.mask;
  fin.position_ids = torch::arange(in.ids.size(1), torch::kLong).expand_as(in.ids);
  fin.prompt_outputs = true;
  torch::NoGradGuard no_grad;
  const auto out = model.forward(fin, nullptr);

  const auto expected = io::read_safetensors(file.string()).tensors;
  // Learned prefixes and prompt vectors make the attention sums longer than the inputs alone.
  const auto prompt = out.hidden.size(1) - in.ids.size(1);
  const auto keys = in.ids.size(1) + prompt + model.prefix_keys();
  for (const auto& [key, e] : expected) {
    const double tol = graft::test::forward_tolerance(model, e, keys);
    const auto name = label + key;
    if (key == "logits") {
      compare(name, out.logits, e, in, tol, v);
    } else if (key == "last_hidden_state") {
      compare(name, out.hidden, e, in, tol, v);
    } else if (key == "pooler_output") {
      compare(name, out.pooled, e, in, tol, v);
    } else if (key.rfind("hidden_states.", 0) != 0) {
      v.fail("output '" + name + "' is not known to this suite");
    }
    // hidden_states.<i>: graft gives the last layer's states (compared as last_hidden_state,
    // which equals the last of these); the inner layers' are not exposed.
  }
}

// Several named adapters on one base (peft's multi-adapter model): every outputs file the case
// lists, each with the adapters chosen as its name says: one adapter alone, the batch routed
// row by row as the case's adapter names say ("mixed"), or every adapter off ("disabled").
Verdict run_multi_adapter_case(const fs::path& root, const json& c, const fs::path& dir,
                               Model& model, const Inputs& in) {
  Verdict v;
  auto logits = [&] {
    torch::NoGradGuard no_grad;
    return model.forward({in.ids, in.mask, {}, {}}, nullptr).logits;
  };
  const auto base = logits();
  AdapterSet set(model);
  for (const auto& [name, path] : c.at("adapter_dirs").items())
    set.load(name, root / path.get<std::string>());
  for (const auto& [file, what] : c.at("outputs_files").items()) {
    const auto stem = fs::path(file).stem().string();
    const auto variant = stem.substr(stem.find('_') + 1);  // outputs_<variant>
    if (variant == "mixed") {
      set.route(c.at("mixed_batch_adapter_names").get<std::vector<std::string>>());
    } else if (variant == "disabled") {
      set.set_active({});
    } else {
      set.set_active({variant});
    }
    compare_outputs(model, in, dir / file, variant + ": ", v);
    if (variant == "disabled" && !torch::equal(logits(), base))
      v.fail("disabled: the logits are not the base model's bit for bit");
    if (set.routed()) set.end_route();
  }
  return v;
}

// graft combine of the case's source adapters, with the case's type, weights and options.
// peft 0.14's svd scales each source twice (w_i s_i times its delta s_i B_i A_i; see the
// fixtures' README), where graft follows the documented sum of w_i times each delta: giving
// graft the weights w_i s_i reproduces peft's result, which is what this checks.
std::unique_ptr<Method> combine_as_peft(const fs::path& root, const json& spec, Model& model) {
  CombineOptions o;
  o.type = spec.at("type");
  std::vector<fs::path> sources;
  for (const auto& d : spec.at("source_dirs")) sources.push_back(root / d.get<std::string>());
  o.weights = spec.at("weights").get<std::vector<double>>();
  if (spec.contains("density")) o.density = spec.at("density");
  if (spec.contains("svd_rank")) o.svd_rank = spec.at("svd_rank");
  if (spec.contains("majority_sign_method")) o.majority_sign = spec.at("majority_sign_method");
  if (o.type == "svd")
    for (std::size_t i = 0; i < sources.size(); ++i) {
      const auto cfg = read_json(sources[i] / "adapter_config.json");
      const double r = cfg.at("r"), alpha = cfg.at("lora_alpha");
      o.weights[i] *= cfg.value("use_rslora", false) ? alpha / std::sqrt(r) : alpha / r;
    }
  return combine_adapters(sources, o, model);
}

// Runs one case of the manifest; `outputs_file` and `adapter` are relative to the case folder.
Verdict run_case(const fs::path& root, const json& c) {
  Verdict v;
  const std::string model_name = c.at("model"), name = c.at("case");
  const fs::path dir = root / c.at("dir").get<std::string>();
  const fs::path model_dir = fs::exists(dir / "model") ? dir / "model"
                             : c.contains("base_model_dir")
                                 ? root / c.at("base_model_dir").get<std::string>()
                                 : root / model_name / "base" / "model";
  auto loaded = load_model(model_dir.string());
  auto& model = *loaded.model;
  const auto in = inputs_of(root, model_name);
  if (c.contains("adapter_dirs")) return run_multi_adapter_case(root, c, dir, model, in);
  std::vector<std::unique_ptr<Method>> methods;
  if (c.contains("combination")) {  // graft's own combination of the sources, then peft's folder
    auto combined = combine_as_peft(root, c.at("combination"), model);
    compare_outputs(model, in, dir / "outputs.safetensors", "graft combine: ", v);
    combined->detach(model);
  }
  if (fs::exists(dir / "adapter")) methods = load_adapter(dir / "adapter", model);
  for (auto& m : methods) m->set_training(false);
  compare_outputs(model, in, dir / "outputs.safetensors", "", v);
  for (const auto* g : {"generate.safetensors"})
    if (fs::exists(dir / g)) compare_generation(model, dir / g, v);
  return v;
}

}  // namespace

TEST_CASE("the reference cases of transformers, peft and AdapterHub") {
  const auto root = reference_dir();
  GRAFT_SKIP_UNLESS_EXISTS(root / "manifest.json");
  graft::test::load_test_plugins();
  const auto manifest = read_json(root / "manifest.json");
  int passed = 0, listed = 0;
  std::set<std::string> seen;
  for (const auto& c : manifest.at("cases")) {
    const std::string id = c.at("dir");
    seen.insert(id);
    Verdict v;
    try {
      v = run_case(root, c);
    } catch (const std::exception& e) {
      v.fail(std::string("error: ") + e.what());
    }
    const auto known = not_yet().find(id);
    if (known != not_yet().end()) {
      ++listed;
      CHECK_MESSAGE(!v.ok, id << " passes now: take it off the not-yet list (it was listed for: "
                              << known->second << ")");
      continue;
    }
    CHECK_MESSAGE(v.ok, id << ": " << v.detail);
    passed += v.ok;
  }
  for (const auto& [id, why] : not_yet())
    CHECK_MESSAGE(seen.count(id), "the not-yet list names " << id << ", which no case has");
  MESSAGE(passed << " reference cases pass; " << listed << " are listed as not run yet");
  std::cout << "reference: " << passed << " of " << manifest.at("cases").size() << " cases pass, "
            << listed << " listed as not yet supported\n";
}
