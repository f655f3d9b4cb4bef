// Running recipes: the training loop, evaluation, checkpoints, resume and the run folder.
#include <ATen/CPUGeneratorImpl.h>
#include <graft/adapter.h>
#include <graft/adapter_set.h>
#include <graft/chat.h>
#include <graft/data.h>
#include <graft/distributed.h>
#include <graft/error.h>
#include <graft/generate.h>
#include <graft/io/file.h>
#include <graft/io/json.h>
#include <graft/io/safetensors.h>
#include <graft/load.h>
#include <graft/plugin.h>
#include <graft/task_head.h>
#include <graft/train.h>
#include <graft/version.h>
#include <sys/resource.h>
#include <torch/torch.h>
#include <unistd.h>
#include <yaml-cpp/yaml.h>

#include <atomic>
#include <chrono>
#include <cmath>
#include <csignal>
#include <cstdio>
#include <fstream>
#include <iomanip>
#include <iostream>
#include <map>
#include <optional>
#include <regex>
#include <set>
#include <sstream>
#include <thread>
#include <type_traits>

#include "build_config.h"
#include "dist/reducer.h"
#include "plugin/site_hooks.h"
#include "recipe/loss.h"
#include "util/file.h"

namespace graft {
namespace fs = std::filesystem;
using nlohmann::json;

namespace {

using Clock = std::chrono::steady_clock;

// A linear classifier on the pooled hidden state, for models without a classification head of
// the task's width (a causal LM classifying by its last token). Saved beside the adapter.
struct TaskHeadImpl : torch::nn::Module {
  TaskHeadImpl(std::int64_t d, std::int64_t labels) {
    linear = register_module("linear", torch::nn::Linear(d, labels));
  }
  torch::nn::Linear linear{nullptr};
};
TORCH_MODULE(TaskHead);

const char* kHeadFile = kTaskHeadFile;

c10::ScalarType dtype_of(const std::string& name) {
  if (name == "bfloat16") return torch::kBFloat16;
  if (name == "float16") return torch::kHalf;
  return torch::kFloat;
}

// Whether libtorch multiplies matrices of `dtype` on `device` (libtorch 1.13 has no float16
// matrix product on CPU): asked of libtorch itself with a 1x1 product.
bool matmul_supported(c10::ScalarType dtype, const torch::Device& device) {
  try {
    const auto one = torch::ones({1, 1}, torch::TensorOptions().dtype(dtype).device(device));
    (void)torch::linear(one, one);
    return true;
  } catch (const c10::Error&) {
    return false;
  }
}

// Everything a run or an evaluation works with.
struct Session {
  LoadedModel loaded;
  std::unique_ptr<AdapterSet> frozen;  // model.adapters, under the methods
  std::vector<std::unique_ptr<Method>> methods;
  TaskHead head{nullptr};
  bool classification = false;
  bool model_head = false;  // the model's own classifier has the task's width
  std::int64_t pad_id = 0;
  torch::Device device = torch::kCPU;
  bool bf16 = false;                 // train.precision: bf16 (forward and loss under autocast)
  std::optional<ChatTemplate> chat;  // instruction tasks with task.template
  Model& model() { return *loaded.model; }
};

Session open_session(const Recipe& r, const torch::Device& device) {
  Session s;
  s.device = device;
  if (s.device.is_cuda() && !torch::cuda::is_available())
    r.params.at("model").at("device").fail(
        "this machine has no CUDA device (or libtorch has no CUDA)");
  s.bf16 = r.train.precision == "bf16";
  if (s.bf16 && !matmul_supported(torch::kBFloat16, s.device))
    r.params.at("train")
        .at("precision")
        .fail("bfloat16 matrix products are not available on " + s.device.str());
  LoadOptions lo;
  lo.family = r.model.family;
  lo.dtype = dtype_of(r.model.dtype);
  if (!matmul_supported(lo.dtype, s.device))
    r.params.at("model").at("dtype").fail(r.model.dtype + " matrix products are not available on " +
                                          s.device.str() + " in this libtorch (" + TORCH_VERSION +
                                          "); use bfloat16 or float32 there");
  lo.device = s.device;
  try {
    s.loaded = load_model(r.model.path, lo);
  } catch (const FileError&) {
    throw;
  } catch (const Error& e) {
    r.params.at("model").at("path").fail(e.what());
  }
  if (!s.loaded.tokenizer)
    r.params.at("model").at("path").fail(
        "the model carries no tokenizer; graft needs one to read text data");
  s.frozen = std::make_unique<AdapterSet>(s.model());
  for (std::size_t i = 0; i < r.model.adapters.size(); ++i) {
    const auto& dir = r.model.adapters[i];
    try {
      s.frozen->load(r.model.adapter_names[i], dir);
    } catch (const FileError&) {
      throw;
    } catch (const Error& e) {
      r.params.at("model").at("adapters").fail(dir.string() + ": " + e.what());
    }
    for (auto* m : s.frozen->methods(r.model.adapter_names[i]))
      for (auto& [name, t] : m->trainable_parameters()) t.requires_grad_(false);
  }
  if (r.model.active) {
    try {
      s.frozen->set_active(*r.model.active);
    } catch (const Error& e) {  // an adapter that changed the base cannot be left out
      r.params.at("model").at("active").fail(e.what());
    }
  }
  s.pad_id = s.loaded.tokenizer->pad_id() >= 0 ? s.loaded.tokenizer->pad_id() : 0;
  s.classification = r.task.kind == "sequence_classification";
  const auto& c = s.model().config();
  s.model_head = s.classification && c.num_labels == r.task.num_labels;
  if (!s.classification && c.family == "bert")
    r.params.at("task").at("kind").fail("bert models are encoders: use sequence_classification");
  if (r.task.chat_template != "none") {
    const auto& key = r.params.at("task").at("template");
    try {
      if (r.task.chat_template != "chat") {
        s.chat = ChatTemplate::named(r.task.chat_template);
      } else if (s.loaded.chat_template.empty()) {
        std::string names;
        for (const auto& n : ChatTemplate::names()) names += (names.empty() ? "" : ", ") + n;
        key.fail(s.loaded.path.string() + " has no chat template: name the format instead (" +
                 names + ")");
      } else {
        s.chat = ChatTemplate::recognise(s.loaded.chat_template);
      }
    } catch (const ParamError&) {
      throw;
    } catch (const Error& e) {
      key.fail(s.loaded.path.string() + ": " + e.what());
    }
  }
  return s;
}

TaskData task_data(const Session& s, const Recipe& r) {
  if (!s.chat) return load_task_data(r.task, *s.loaded.tokenizer, r.seed);
  try {
    return load_task_data(r.task, *s.loaded.tokenizer, r.seed, &*s.chat);
  } catch (const FileError&) {
    throw;
  } catch (const Error& e) {  // the format needs a token the vocabulary lacks
    r.params.at("task").at("template").fail(e.what());
  }
}

// How many hooks a site holds; what a method attached is what grew.
std::size_t hook_count(const SiteHooks& h) { return all_hooks(h).size(); }

// methods[i] with `from: DIR`: the method as the adapter at DIR saved it (settings and state),
// attached to train further. The folder must hold exactly one method of the item's name, and
// nothing else (train the others on with items of their own, or load them with model.adapters).
std::unique_ptr<Method> continue_from(const Params& item, Model& model) {
  const auto name = item.at("name").as_string();
  const auto& from = item.at("from");
  std::vector<std::unique_ptr<Method>> loaded;
  try {
    loaded = load_adapter(std::filesystem::absolute(from.as_string()), model);
  } catch (const FileError&) {
    throw;
  } catch (const Error& e) {
    from.fail(e.what());
  }
  if (loaded.size() != 1 || loaded[0]->name() != name) {
    std::string held;
    for (const auto& m : loaded) held += (held.empty() ? "" : ", ") + m->name();
    for (auto& m : loaded) m->detach(model);
    from.fail("holds " + held + "; continuing training takes an adapter of one method, " + name);
  }
  for (auto& [param, t] : loaded[0]->trainable_parameters()) t.requires_grad_(true);
  return std::move(loaded[0]);
}

// Combinations that are legal to build but that no one means, refused in one line each:
// - the same method twice at one site (two low-rank deltas there are one of the summed rank, two
//   scales one scale; give each its own targets, or make one larger);
// - a method attached at a linear site whose base weight another method trains (the weight is
//   trained already; a delta beside it only adds parameters, and a quantised base cannot be
//   trained).
void attach_methods(Session& s, const Recipe& r) {
  const auto& items = r.methods.items();
  auto& model = s.model();
  std::map<std::string, std::vector<std::pair<std::string, std::size_t>>> at_site;  // name, item
  for (std::size_t i = 0; i < items.size(); ++i) {
    const auto& item = items[i];
    std::vector<std::size_t> before;
    for (const auto& site : model.sites()) before.push_back(hook_count(model.hooks(site.name)));
    std::unique_ptr<Method> m;
    if (item.has("from")) {
      m = continue_from(item, model);
    } else {
      m = make_method(item.at("name").as_string(), item);
      try {
        m->attach(model);
      } catch (const ParamError&) {
        throw;
      } catch (const Error& e) {
        item.fail(e.what());  // a conflicting claim, a site the method cannot use
      }
    }
    for (std::size_t k = 0; k < model.sites().size(); ++k) {
      const auto& site = model.sites()[k].name;
      if (hook_count(model.hooks(site)) == before[k]) continue;
      for (const auto& [name, j] : at_site[site])
        if (name == m->name())
          item.fail(name + " adapts " + site + ", which methods[" + std::to_string(j) + "] (" +
                    name + ") adapts already: one method twice at a site is one of them " +
                    "with more capacity; give each its own targets, or make one larger");
      at_site[site].emplace_back(m->name(), i);
    }
    s.methods.push_back(std::move(m));
  }
  for (const auto& site : model.sites()) {
    if (!Model::is_linear_point(site.point) || at_site[site.name].empty()) continue;
    const auto* linear = model.linear(site.name);
    if (!linear || !linear->weight.requires_grad()) continue;
    const auto& [other, j] = at_site[site.name].front();
    // Which method trains it: the one whose trainable tensors hold the weight (a method that
    // picks its tensors from calibration batches cannot say yet, and is not such a method).
    for (std::size_t i = 0; i < s.methods.size(); ++i) {
      if (s.methods[i]->needs_calibration()) continue;
      for (const auto& [param, tensor] : s.methods[i]->trainable_parameters())
        if (linear->weight.is_same(tensor))
          items[i].fail(s.methods[i]->name() + " trains the base weight of " + site.name +
                        ", where methods[" + std::to_string(j) + "] (" + other +
                        ") is attached: train the weight or adapt it, not both (leave the site "
                        "out of one of them)");
    }
    items[j].fail(other + " is attached at " + site.name +
                  ", whose base weight this recipe also trains: train the weight or adapt it, "
                  "not both");
  }
  if (s.classification && !s.model_head) {
    s.head = TaskHead(s.model().config().hidden_size, r.task.num_labels);
    s.head->to(s.device);
  }
}

// Models with learned position tables (bert, gpt2) cannot read past them: task.max_length plus
// what methods put in front (prefix or prompt tokens) must fit.
void check_lengths(Session& s, const Recipe& r) {
  const auto& c = s.model().config();
  if (c.family == "llama" || c.max_positions <= 0) return;  // rotary positions: no table
  const auto needed = r.task.max_length + s.model().prefix_length();
  if (needed > c.max_positions) {
    const auto& task = r.params.at("task");
    (task.has("max_length") ? task.at("max_length") : task)
        .fail("max_length " + std::to_string(r.task.max_length) +
              (s.model().prefix_length()
                   ? " plus " + std::to_string(s.model().prefix_length()) + " virtual tokens"
                   : std::string()) +
              " is more than the " + std::to_string(c.max_positions) +
              " positions this model has learned");
  }
}

// A classification task's logits [B, labels]: the model's own classifier, or the task head on
// its pooled states. (Language modelling goes through causal_lm_loss / score_causal_lm.)
at::Tensor task_logits(Session& s, const Batch& b) {
  auto out = s.model().forward({b.input_ids, b.attention_mask, {}, {}}, nullptr);
  if (s.model_head) return out.logits;
  const auto pooled = pooled_for_classification(s.model(), out, b.attention_mask);
  return s.head->linear(pooled.to(s.head->linear->weight.dtype()));
}

// The forward and loss of one batch, under the recipe's precision (the backward runs outside).
LossParts task_loss(Session& s, const Batch& b) {
  Autocast autocast(s.bf16, s.device);
  if (!s.classification) return causal_lm_loss(s.model(), b);
  auto logits = task_logits(s, b).to(torch::kFloat);
  auto sum = torch::cross_entropy_loss(logits, b.labels, {}, at::Reduction::Sum);
  return {sum / static_cast<double>(b.labels.size(0)), b.labels.size(0), sum};
}

// What task_loss scores in a batch (tokens, or examples for classification), known before the
// forward: a step's loss is the sum over its targets divided by all of the step's targets, on
// every rank, so that N ranks and one process (with or without accumulation) mean the same.
std::int64_t task_targets(const Session& s, const Batch& b) {
  return s.classification ? b.labels.size(0) : causal_lm_targets(b);
}

Batch to_device(Batch b, const torch::Device& d) {
  b.input_ids = b.input_ids.to(d);
  b.attention_mask = b.attention_mask.to(d);
  b.labels = b.labels.to(d);
  return b;
}

void set_training(Session& s, bool on) {
  for (auto& m : s.methods) m->set_training(on);
  if (s.head) s.head->train(on);
}

// The evaluation of `data` in batches of `batch_size` (the first `max_batches` of them; 0: all).
// In a run of several ranks, rank k evaluates batches k, k + N, ... and the sums are reduced:
// every rank gets the metrics one process would (up to the order of the loss's summation).
json evaluate(Session& s, const std::vector<Example>& data, std::int64_t batch_size,
              std::int64_t max_batches, const std::vector<std::string>& metrics,
              ProcessGroup& group, std::int64_t labels) {
  torch::NoGradGuard no_grad;
  Autocast autocast(s.bf16, s.device);
  set_training(s, false);
  double loss_sum = 0;
  std::int64_t scored = 0, correct = 0, batches = 0;
  std::vector<std::int64_t> tp(labels), fp(labels), fn(labels);
  for (std::size_t at = 0; at < data.size(); at += batch_size) {
    if (max_batches > 0 && batches >= max_batches) break;
    if (batches++ % group.size() != group.rank()) continue;
    std::vector<std::size_t> which;
    for (std::size_t i = at; i < std::min(data.size(), at + batch_size); ++i) which.push_back(i);
    auto b = to_device(make_batch(data, which, s.pad_id, s.classification), s.device);
    if (s.classification) {
      auto logits = task_logits(s, b).to(torch::kFloat);
      loss_sum +=
          torch::cross_entropy_loss(logits, b.labels, {}, at::Reduction::Sum).item<double>();
      auto pred = logits.argmax(-1).cpu();
      auto gold = b.labels.cpu();
      const auto k = static_cast<std::size_t>(logits.size(-1));
      if (k > tp.size()) tp.resize(k), fp.resize(k), fn.resize(k);
      for (std::int64_t i = 0; i < pred.size(0); ++i) {
        const auto p = pred[i].item<std::int64_t>(), g = gold[i].item<std::int64_t>();
        if (p == g) {
          ++correct;
          ++tp[p];
        } else {
          ++fp[p];
          ++fn[g];
        }
      }
      scored += pred.size(0);
    } else {
      const auto lm = score_causal_lm(s.model(), b);
      loss_sum += lm.loss_sum;
      correct += lm.correct;
      scored += lm.scored;
    }
  }
  if (group.size() > 1) {
    std::vector<double> sums{loss_sum, static_cast<double>(scored), static_cast<double>(correct)};
    for (const auto* v : {&tp, &fp, &fn})
      for (auto n : *v) sums.push_back(static_cast<double>(n));
    auto t = torch::tensor(sums, torch::kDouble).to(s.device);
    group.allreduce_sum(t);
    t = t.cpu();
    const auto* a = t.data_ptr<double>();
    loss_sum = a[0];
    scored = static_cast<std::int64_t>(a[1]);
    correct = static_cast<std::int64_t>(a[2]);
    std::size_t i = 3;
    for (auto* v : {&tp, &fp, &fn})
      for (auto& n : *v) n = static_cast<std::int64_t>(a[i++]);
  }
  json out = json::object();
  if (scored == 0) return out;
  const double loss = loss_sum / scored;
  for (const auto& m : metrics) {
    if (m == "loss") out["loss"] = loss;
    if (m == "perplexity") out["perplexity"] = std::exp(loss);
    if (m == "accuracy") out["accuracy"] = static_cast<double>(correct) / scored;
    if (m == "f1") {
      // Binary: the F1 of class 1; more classes: the mean F1 over classes (macro).
      auto f1 = [&](std::size_t c) {
        const double d = 2.0 * tp[c] + fp[c] + fn[c];
        return d > 0 ? 2.0 * tp[c] / d : 0.0;
      };
      double sum = 0;
      for (std::size_t c = 0; c < tp.size(); ++c) sum += f1(c);
      out["f1"] = tp.size() == 2 ? f1(1) : sum / std::max<std::size_t>(tp.size(), 1);
    }
  }
  return out;
}

std::string sample(Session& s, const Recipe& r) {
  if (r.generate.prompt.empty()) return {};
  torch::NoGradGuard no_grad;
  set_training(s, false);
  const auto& tok = *s.loaded.tokenizer;
  GenerationOptions g;
  g.max_new_tokens = r.generate.max_new_tokens;
  if (tok.eos_id() >= 0) g.stop_ids = {tok.eos_id()};
  std::vector<std::int64_t> ids;
  if (s.chat) {  // the prompt as the user's turn; the answer stops at the end of its turn
    std::vector<ChatMessage> messages;
    if (!r.task.system.empty()) messages.push_back({"system", r.task.system});
    messages.push_back({"user", r.generate.prompt});
    ids = s.chat->encode(tok, messages, true);
    const auto end = tok.id(s.chat->end_of_turn(tok.eos_id() >= 0 ? tok.token(tok.eos_id()) : ""));
    if (end >= 0) g.stop_ids.push_back(end);
  } else {
    ids = tok.encode(r.generate.prompt, true);
  }
  auto out =
      generate(s.model(), torch::tensor(ids, torch::kLong).view({1, -1}).to(s.device), {}, g);
  // Decoded together with the prompt, so that the first new token keeps its leading space (a
  // chat's answer starts a turn: decoded alone).
  if (s.chat) ids.clear();
  auto row = out[0].cpu();
  for (std::int64_t i = 0; i < row.size(0); ++i)
    if (row[i].item<std::int64_t>() >= 0) ids.push_back(row[i].item<std::int64_t>());
  return tok.decode(ids);
}

std::vector<std::pair<std::string, at::Tensor>> trainable(Session& s) {
  std::vector<std::pair<std::string, at::Tensor>> out;
  for (std::size_t i = 0; i < s.methods.size(); ++i)
    for (auto& [name, t] : s.methods[i]->trainable_parameters())
      out.emplace_back(std::to_string(i) + "." + name, t);
  if (s.head)
    for (const auto& p : s.head->named_parameters(true))
      out.emplace_back("head." + p.key(), p.value());
  return out;
}

double lr_at(const TrainSpec& t, std::int64_t step, std::int64_t total) {
  // step counts from 0: the learning rate of the step about to be taken.
  if (t.warmup_steps > 0 && step < t.warmup_steps)
    return t.lr * static_cast<double>(step + 1) / static_cast<double>(t.warmup_steps);
  const double span = std::max<std::int64_t>(1, total - t.warmup_steps);
  const double progress = static_cast<double>(step - t.warmup_steps) / span;
  if (t.schedule == "linear") return t.lr * std::max(0.0, 1.0 - progress);
  if (t.schedule == "cosine") return t.lr * 0.5 * (1.0 + std::cos(M_PI * std::min(1.0, progress)));
  return t.lr;
}

std::unique_ptr<torch::optim::Optimizer> make_optimizer(const TrainSpec& t,
                                                        const std::vector<at::Tensor>& params) {
  if (t.optimizer == "sgd")
    return std::make_unique<torch::optim::SGD>(
        params, torch::optim::SGDOptions(t.lr).momentum(t.momentum).weight_decay(t.weight_decay));
  return std::make_unique<torch::optim::AdamW>(params, torch::optim::AdamWOptions(t.lr)
                                                           .betas({t.beta1, t.beta2})
                                                           .eps(t.eps)
                                                           .weight_decay(t.weight_decay));
}

// The key of a parameter's state: libtorch 1.13 keys it by the TensorImpl's address printed as
// a string, libtorch 2.x by the address itself.
template <typename Map>
typename Map::key_type state_key(const Map&, const at::Tensor& p) {
  if constexpr (std::is_same_v<typename Map::key_type, std::string>) {
    std::ostringstream os;
    os << p.unsafeGetTensorImpl();
    return os.str();
  } else {
    return p.unsafeGetTensorImpl();
  }
}

std::vector<at::Tensor> optimizer_params(torch::optim::Optimizer& opt) {
  std::vector<at::Tensor> out;
  for (auto& g : opt.param_groups())
    for (auto& p : g.params()) out.push_back(p);
  return out;
}

// The optimizer's per-parameter state as plain tensors and counts, in the order of its
// parameters: "<k>.exp_avg", "<k>.exp_avg_sq", "<k>.max_exp_avg_sq" (AdamW), "<k>.momentum"
// (SGD); returns the AdamW step counts (-1: no state yet). Checkpoints keep it as safetensors +
// JSON, never as a pickle or TorchScript archive, which can run code when read.
json optimizer_state(torch::optim::Optimizer& opt, io::TensorMap& tensors) {
  json steps = json::array();
  const auto params = optimizer_params(opt);
  for (std::size_t k = 0; k < params.size(); ++k) {
    const auto key = std::to_string(k) + ".";
    auto it = opt.state().find(state_key(opt.state(), params[k]));
    if (it == opt.state().end()) {
      steps.push_back(-1);
      continue;
    }
    if (auto* a = dynamic_cast<torch::optim::AdamWParamState*>(it->second.get())) {
      steps.push_back(a->step());
      tensors[key + "exp_avg"] = a->exp_avg().detach().cpu();
      tensors[key + "exp_avg_sq"] = a->exp_avg_sq().detach().cpu();
      if (a->max_exp_avg_sq().defined())
        tensors[key + "max_exp_avg_sq"] = a->max_exp_avg_sq().detach().cpu();
    } else if (auto* m = dynamic_cast<torch::optim::SGDParamState*>(it->second.get())) {
      steps.push_back(0);
      if (m->momentum_buffer().defined())
        tensors[key + "momentum"] = m->momentum_buffer().detach().cpu();
    } else {
      throw Error("checkpoint: an optimizer state graft does not know how to save");
    }
  }
  return steps;
}

void load_optimizer_state(torch::optim::Optimizer& opt, const json& steps,
                          const io::TensorMap& tensors, const std::string& where) {
  const auto params = optimizer_params(opt);
  if (!steps.is_array() || steps.size() != params.size())
    throw FileError(where, "holds optimizer state for " +
                               std::to_string(steps.is_array() ? steps.size() : 0) +
                               " tensors, but the run trains " + std::to_string(params.size()));
  const bool adamw = dynamic_cast<torch::optim::AdamW*>(&opt) != nullptr;
  auto tensor = [&](const std::string& name, const at::Tensor& like) {
    auto it = tensors.find(name);
    if (it == tensors.end()) throw FileError(where, "lacks optimizer tensor " + name);
    if (it->second.sizes() != like.sizes())
      throw FileError(where, "optimizer tensor " + name + " has the wrong shape");
    return it->second.to(like.device(), like.scalar_type());
  };
  opt.state().clear();
  for (std::size_t k = 0; k < params.size(); ++k) {
    if (!steps[k].is_number_integer()) throw FileError(where, "malformed optimizer step counts");
    const auto step = steps[k].get<std::int64_t>();
    if (step < 0) continue;
    const auto key = std::to_string(k) + ".";
    const auto& p = params[k];
    if (adamw) {
      auto st = std::make_unique<torch::optim::AdamWParamState>();
      st->step(step);
      st->exp_avg(tensor(key + "exp_avg", p));
      st->exp_avg_sq(tensor(key + "exp_avg_sq", p));
      if (tensors.count(key + "max_exp_avg_sq"))
        st->max_exp_avg_sq(tensor(key + "max_exp_avg_sq", p));
      opt.state()[state_key(opt.state(), p)] = std::move(st);
    } else {
      auto st = std::make_unique<torch::optim::SGDParamState>();
      if (tensors.count(key + "momentum")) st->momentum_buffer(tensor(key + "momentum", p));
      opt.state()[state_key(opt.state(), p)] = std::move(st);
    }
  }
}

void set_lr(torch::optim::Optimizer& opt, double lr) {
  for (auto& g : opt.param_groups()) g.options().set_lr(lr);
}

std::string git_commit() {
  const std::string cmd = "git -C \"" + fs::path(GRAFT_SOURCE_DATA_DIR).parent_path().string() +
                          "\" rev-parse HEAD 2>/dev/null";
  std::string out;
  if (FILE* p = popen(cmd.c_str(), "r")) {
    char buf[128];
    while (fgets(buf, sizeof buf, p)) out += buf;
    pclose(p);
  }
  while (!out.empty() && std::isspace(static_cast<unsigned char>(out.back()))) out.pop_back();
  return out.empty() ? "unknown" : out;
}

std::string cpu_model() {
  std::ifstream in("/proc/cpuinfo");
  std::string line;
  while (std::getline(in, line))
    if (line.rfind("model name", 0) == 0) return line.substr(line.find(':') + 2);
  return "unknown";
}

json manifest(const Recipe& r, const RunOptions& o, const ProcessGroup& group) {
  json plugins = json::array();
  for (const auto& m : registered_methods())
    plugins.push_back(
        {{"name", m.info.name}, {"version", m.info.version}, {"file", m.file.string()}});
  return {{"graft_version", GRAFT_VERSION},
          {"git_commit", git_commit()},
          {"libtorch_version", TORCH_VERSION},
          {"plugins", plugins},
          {"hardware",
           {{"cpu", cpu_model()},
            {"cores", available_cores()},
            {"torch_threads", torch::get_num_threads()},
            {"device", r.model.device}}},
          {"seed", r.seed},
          {"distributed",
           {{"world_size", group.size()},
            {"backend", group.backend()},
            {"launcher", o.launch.launcher.empty() ? "none" : o.launch.launcher}}},
          {"recipe", fs::absolute(r.file).lexically_normal().string()},
          {"command", o.command_line}};
}

void write_json(const fs::path& path, const json& j) {
  // Generated text may hold invalid UTF-8 (a model emitting raw bytes): replaced, not fatal.
  io::write_atomically(path, [&](std::ostream& out) {
    out << j.dump(2, ' ', false, json::error_handler_t::replace) << "\n";
  });
}

void write_metrics(const fs::path& path, const std::vector<json>& lines) {
  io::write_atomically(path, [&](std::ostream& out) {
    for (const auto& l : lines)
      out << l.dump(-1, ' ', false, json::error_handler_t::replace) << "\n";
  });
}

std::string fixed(double v, int digits) {
  std::ostringstream os;
  os << std::fixed << std::setprecision(digits) << v;
  return os.str();
}

std::string metrics_line(const json& m) {
  std::string s;
  for (const auto& [k, v] : m.items())
    if (v.is_number()) s += (s.empty() ? "" : ", ") + k + " " + fixed(v.get<double>(), 4);
  return s;
}

std::string duration(double seconds) {
  const auto s = static_cast<std::int64_t>(seconds + 0.5);
  std::ostringstream os;
  os << s / 60 << ":" << std::setw(2) << std::setfill('0') << s % 60;
  return os.str();
}

void save_head(Session& s, const fs::path& dir) {
  if (!s.head) return;
  io::TensorMap t;
  for (const auto& p : s.head->named_parameters(true)) t[p.key()] = p.value().detach().cpu();
  io::write_safetensors(dir / kHeadFile, t, {{"format", "graft-task-head"}});
}

void load_head(Session& s, const fs::path& dir) {
  if (!s.head || !fs::exists(dir / kHeadFile)) return;
  auto t = io::read_safetensors((dir / kHeadFile).string()).tensors;
  torch::NoGradGuard no_grad;
  for (auto& p : s.head->named_parameters(true)) {
    auto it = t.find(p.key());
    if (it == t.end() || it->second.sizes() != p.value().sizes())
      throw FileError((dir / kHeadFile).string(), "does not hold a head of this task's shape");
    p.value().copy_(it->second);
  }
}

// --- checkpoints ---------------------------------------------------------------------------

struct Position {
  std::int64_t step = 0;           // optimizer steps done
  std::int64_t micro_batches = 0;  // micro-batches consumed
  double window_loss = 0;          // summed step losses since the last logged line
  std::int64_t window_steps = 0;   // (kept, so a resumed run logs the same means)
};

const char* kCheckpointFormat = "graft-checkpoint";

// A symbolic link where graft writes would send its writes (and its deletions) elsewhere.
void refuse_symlink(const fs::path& p) {
  if (fs::is_symlink(p))
    throw FileError(p.string(),
                    "is a symbolic link; inside a run folder graft writes only files and folders "
                    "it made: remove the link, or choose another output.dir");
}

// The checkpoints in a run folder, oldest first by step number: real folders (no links) named
// step-<digits> that hold a trainer.json. Anything else there is left alone.
std::vector<std::pair<std::int64_t, fs::path>> checkpoints_in(const fs::path& run) {
  std::vector<std::pair<std::int64_t, fs::path>> out;
  const auto dir = run / "checkpoints";
  refuse_symlink(dir);
  if (!fs::is_directory(dir)) return out;
  static const std::regex name(R"(step-([0-9]{1,18}))");
  for (const auto& e : fs::directory_iterator(dir)) {
    std::smatch m;
    const auto file = e.path().filename().string();
    if (e.is_symlink() || !e.is_directory() || !std::regex_match(file, m, name)) continue;
    const auto trainer = e.path() / "trainer.json";
    if (fs::is_symlink(trainer) || !fs::is_regular_file(trainer)) continue;
    out.emplace_back(std::stoll(m[1].str()), e.path());
  }
  std::sort(out.begin(), out.end());
  return out;
}

fs::path checkpoint_dir(const fs::path& run, std::int64_t step) {
  std::ostringstream os;
  os << "step-" << std::setw(6) << std::setfill('0') << step;
  return run / "checkpoints" / os.str();
}

// A testing aid for the kill tests (tests/integration/kill.sh): GRAFT_FAILPOINT=step:N kills the
// process with SIGKILL as step N begins, GRAFT_FAILPOINT=checkpoint:N half-way through writing
// the checkpoint of step N, as the OOM killer or a power cut would. Unset in normal use.
void failpoint(const char* where, std::int64_t step) {
  static const std::string spec = [] {
    const char* e = std::getenv("GRAFT_FAILPOINT");
    return e ? std::string(e) : std::string();
  }();
  if (!spec.empty() && spec == std::string(where) + ":" + std::to_string(step)) ::raise(SIGKILL);
}

// Every rank's random state, on every rank (a checkpoint keeps each, so that dropout resumes
// exactly): rows of a [ranks, bytes] tensor summed over the ranks, each rank filling its own.
std::vector<at::Tensor> random_states(ProcessGroup& group, const torch::Device& device) {
  const auto mine = at::detail::getDefaultCPUGenerator().get_state();
  if (group.size() == 1) return {mine};
  auto all = torch::zeros({group.size(), mine.numel()}, mine.options());
  all[group.rank()].copy_(mine);
  auto on = all.to(device);
  group.allreduce_sum(on);
  all = on.cpu();
  std::vector<at::Tensor> out;
  for (int k = 0; k < group.size(); ++k) out.push_back(all[k].clone());
  return out;
}

// The checkpoint's name for rank k's random state ("rng.cpu" for rank 0, as one process has it).
std::string rng_key(int rank) { return rank == 0 ? "rng.cpu" : "rng.cpu." + std::to_string(rank); }

// Rank 0 writes; every rank calls it (the random states are gathered).
void save_checkpoint(Session& s, torch::optim::Optimizer& opt, const Position& pos,
                     const std::vector<json>& metrics, const json& extra, const fs::path& run,
                     std::int64_t keep, ProcessGroup& group) {
  const auto rngs = random_states(group, s.device);
  if (group.rank() != 0) return;
  const auto dir = checkpoint_dir(run, pos.step);
  auto tmp = dir;
  tmp += ".tmp";
  fs::remove_all(tmp);
  io::MadeFolder made(tmp);  // a failure part-way (a full disk) leaves no step-N.tmp behind
  io::TensorMap t;
  for (std::size_t i = 0; i < s.methods.size(); ++i)
    for (const auto& [k, v] : s.methods[i]->checkpoint_state())
      t[std::to_string(i) + "." + k] = v.detach().cpu();
  if (s.head)
    for (const auto& p : s.head->named_parameters(true))
      t["head." + p.key()] = p.value().detach().cpu();
  for (int k = 0; k < group.size(); ++k) t[rng_key(k)] = rngs[static_cast<std::size_t>(k)];
  io::write_safetensors(tmp / "state.safetensors", t, {{"format", "graft-checkpoint"}});
  io::TensorMap moments;
  const auto steps = optimizer_state(opt, moments);
  io::write_safetensors(tmp / "optimizer.safetensors", moments, {{"format", "graft-optimizer"}});
  failpoint("checkpoint", pos.step);
  write_json(tmp / "trainer.json", {{"format", kCheckpointFormat},
                                    {"step", pos.step},
                                    {"world_size", group.size()},
                                    {"optimizer_steps", steps},
                                    {"micro_batches", pos.micro_batches},
                                    {"window_loss", pos.window_loss},
                                    {"window_steps", pos.window_steps},
                                    {"metrics", metrics},
                                    {"extra", extra}});
  fs::remove_all(dir);
  fs::rename(tmp, dir);
  made.keep();
  // Keep the newest `keep` of the checkpoints graft wrote (by their marker; nothing else in the
  // folder is touched), by step number.
  auto all = checkpoints_in(run);
  all.erase(
      std::remove_if(all.begin(), all.end(),
                     [](const auto& c) {
                       try {
                         return io::read_json_file(c.second / "trainer.json").value("format", "") !=
                                kCheckpointFormat;
                       } catch (const std::exception&) {
                         return true;  // not one graft wrote
                       }
                     }),
      all.end());
  for (std::size_t i = 0; i + keep < all.size(); ++i) fs::remove_all(all[i].second);
}

}  // namespace

fs::path latest_checkpoint(const fs::path& run) {
  const auto all = checkpoints_in(run);
  return all.empty() ? fs::path() : all.back().second;
}

namespace {

// The methods' and the head's state, before the optimizer is built over their tensors (a
// calibrated method knows what it trains only from its state).
void load_checkpoint_methods(Session& s, const fs::path& dir) {
  // Pickles and TorchScript archives run code when they are read: a checkpoint with one (older
  // graft wrote optimizer.pt; a shared run folder may hold anything) is refused, never opened.
  for (const auto& e : fs::directory_iterator(dir)) {
    const auto ext = e.path().extension().string();
    if (ext == ".pt" || ext == ".pth" || ext == ".bin" || ext == ".pkl" || ext == ".pickle")
      throw FileError(
          e.path().string(),
          "a pickle or TorchScript archive, which can run code when read: graft "
          "resumes only from safetensors and JSON (an earlier graft wrote optimizer.pt: "
          "start such a run again with --overwrite)");
  }
  const auto where = (dir / "state.safetensors").string();
  auto t = io::read_safetensors(where).tensors;
  for (std::size_t i = 0; i < s.methods.size(); ++i) {
    io::TensorMap mine;
    const auto prefix = std::to_string(i) + ".";
    for (const auto& [k, v] : t)
      if (k.rfind(prefix, 0) == 0) mine[k.substr(prefix.size())] = v.to(s.device);
    s.methods[i]->load_checkpoint_state(mine, where);
  }
  if (s.head) {
    torch::NoGradGuard no_grad;
    for (auto& p : s.head->named_parameters(true)) p.value().copy_(t.at("head." + p.key()));
  }
}

// A run resumes with as many ranks as it was written by: the data and the optimizer would
// reshard, but each rank's random state (dropout) belongs to its rank.
void refuse_other_world_size(const fs::path& dir, const ProcessGroup& group) {
  const auto j = io::read_json_file(dir / "trainer.json");
  const auto written_by = j.value("world_size", 1);
  if (written_by != group.size())
    throw Error(dir.string() + ": written by a run of " + std::to_string(written_by) + " process" +
                (written_by == 1 ? "" : "es") + ", resumed with " + std::to_string(group.size()) +
                "; resume with the same number (" +
                (written_by == 1 ? std::string("one process, no --nproc")
                                 : "--nproc " + std::to_string(written_by)) +
                "): each rank's random state belongs to its rank");
}

// The optimizer, this rank's random state, the data position and the metrics so far (from a
// checkpoint refuse_other_world_size() accepted).
json load_checkpoint_trainer(torch::optim::Optimizer& opt, const fs::path& dir, Position& pos,
                             std::vector<json>& metrics, const ProcessGroup& group) {
  const auto j = io::read_json_file(dir / "trainer.json");
  const auto t = io::read_safetensors((dir / "state.safetensors").string()).tensors;
  {
    const auto it = t.find(rng_key(group.rank()));
    if (it == t.end())
      throw FileError((dir / "state.safetensors").string(), "lacks " + rng_key(group.rank()) +
                                                                ", the random state of rank " +
                                                                std::to_string(group.rank()));
    auto gen = at::detail::getDefaultCPUGenerator();  // a handle to the process's generator
    gen.set_state(it->second);
  }
  const auto moments = dir / "optimizer.safetensors";
  load_optimizer_state(opt, j.value("optimizer_steps", json()),
                       io::read_safetensors(moments.string()).tensors, moments.string());
  pos.step = j.at("step").get<std::int64_t>();
  pos.micro_batches = j.at("micro_batches").get<std::int64_t>();
  pos.window_loss = j.value("window_loss", 0.0);
  pos.window_steps = j.value("window_steps", std::int64_t{0});
  metrics = j.at("metrics").get<std::vector<json>>();
  return j.value("extra", json::object());
}

bool on_terminal() { return isatty(fileno(stderr)) != 0; }

double peak_memory_mib() {
  rusage u{};
  getrusage(RUSAGE_SELF, &u);
  return static_cast<double>(u.ru_maxrss) / 1024.0;
}

}  // namespace

namespace {

// --- interruption --------------------------------------------------------------------------

std::atomic<int> g_signal{0};

extern "C" void on_stop_signal(int sig) {
  // A second signal ends the process at once, as the default action would.
  if (g_signal.exchange(sig) != 0) {
    std::signal(sig, SIG_DFL);
    std::raise(sig);
  }
}

// SIGINT and SIGTERM ask the training loop to stop at the next step boundary while it runs;
// the previous handlers come back afterwards.
class StopSignals {
 public:
  explicit StopSignals(bool on) : on_(on) {
    if (!on_) return;
    g_signal = 0;
    int_ = std::signal(SIGINT, on_stop_signal);
    term_ = std::signal(SIGTERM, on_stop_signal);
  }
  ~StopSignals() {
    if (!on_) return;
    std::signal(SIGINT, int_);
    std::signal(SIGTERM, term_);
  }
  int pending() const { return on_ ? g_signal.load() : 0; }

 private:
  bool on_;
  void (*int_)(int) = SIG_DFL;
  void (*term_)(int) = SIG_DFL;
};

// Where two resolved recipes differ, as key paths the command line takes ("train.steps: 100 in
// the run, 10 now"), at most `limit` of them.
void yaml_differences(const YAML::Node& was, const YAML::Node& now, const std::string& path,
                      std::vector<std::string>& out) {
  auto shown = [](const YAML::Node& n) {
    if (!n.IsDefined() || n.IsNull()) return std::string("absent");
    if (n.IsScalar()) return n.Scalar();
    YAML::Emitter e;
    e << YAML::Flow << n;
    return std::string(e.c_str());
  };
  auto child = [&](const std::string& key) { return path.empty() ? key : path + "." + key; };
  const bool both = was.IsDefined() && now.IsDefined();  // an absent key's node is invalid
  if (both && was.IsMap() && now.IsMap()) {
    std::vector<std::string> keys;
    for (const auto& kv : was) keys.push_back(kv.first.Scalar());
    for (const auto& kv : now)
      if (!was[kv.first.Scalar()].IsDefined()) keys.push_back(kv.first.Scalar());
    for (const auto& k : keys) yaml_differences(was[k], now[k], child(k), out);
  } else if (both && was.IsSequence() && now.IsSequence() && was.size() == now.size()) {
    for (std::size_t i = 0; i < was.size(); ++i)
      yaml_differences(was[i], now[i], path + "[" + std::to_string(i) + "]", out);
  } else if (shown(was) != shown(now)) {
    out.push_back(path + ": " + shown(was) + " in the run, " + shown(now) + " now");
  }
}

std::string recipe_differences(const std::string& was, const std::string& now) {
  std::vector<std::string> diffs;
  try {
    yaml_differences(YAML::Load(was), YAML::Load(now), "", diffs);
  } catch (const YAML::Exception&) {
    return "";
  }
  std::string out;
  const std::size_t limit = 5;
  for (std::size_t i = 0; i < diffs.size() && i < limit; ++i) out += (i ? "; " : "") + diffs[i];
  if (diffs.size() > limit) out += "; and " + std::to_string(diffs.size() - limit) + " more";
  return out;
}

// The files graft writes in a run folder; --overwrite removes these and nothing else.
const char* kRunFiles[] = {"recipe.yaml",  "manifest.json", "metrics.jsonl",
                           "summary.json", "adapter",       "checkpoints"};

// What is already in output.dir decides whether the run may start: nothing of graft's, a run
// with no progress (stopped before its first checkpoint: started again, with or without
// --resume), or a run to resume or overwrite. Returns whether graft's files there are to go (once
// the new run is ready to write).
bool check_run_folder(const fs::path& run, const std::string& recipe_text, const RunOptions& o,
                      std::ostream& log) {
  for (const char* name : kRunFiles) refuse_symlink(run / name);
  const bool has_run = fs::exists(run / "recipe.yaml") || fs::exists(run / "metrics.jsonl");
  const bool finished = fs::exists(run / "summary.json");
  const auto checkpoint = latest_checkpoint(run);
  const std::string where = run.string() + ": ";
  if (o.resume && o.overwrite) throw Error("give either --resume or --overwrite, not both");
  if (o.resume) {
    if (!has_run)
      throw Error(where + "no run to resume here (no recipe.yaml); start it without --resume");
    if (checkpoint.empty() && !finished) {  // killed or failed early: no progress to lose
      log << where << "the run there stopped before its first checkpoint; starting it again\n";
      return true;
    }
    if (fs::exists(run / "recipe.yaml")) {
      const auto was = io::read_text_file(run / "recipe.yaml");
      if (was != recipe_text) {
        const auto diff = recipe_differences(was, recipe_text);
        throw Error(where +
                    "the recipe (with its overrides) differs from the one this run started with" +
                    (diff.empty() ? "" : " (" + diff + ")") +
                    "; resume with the same recipe and overrides, or with " +
                    (run / "recipe.yaml").string());
      }
    }
    if (finished)
      throw Error(where +
                  "the run finished (summary.json); nothing to resume. Start it again "
                  "with --overwrite, or choose another folder (output.dir=...)");
    return false;
  }
  if (!has_run) return false;
  if (!o.overwrite && (finished || !checkpoint.empty()))
    throw Error(where +
                (finished ? "already holds a finished run"
                          : "already holds a run with checkpoints (the latest is " +
                                checkpoint.filename().string() + ")") +
                "; add " + (finished ? "" : "--resume to continue it, ") +
                "--overwrite to start it again, or choose another folder (output.dir=...)");
  if (!o.overwrite)
    log << where << "the run there stopped before its first checkpoint; starting it again\n";
  return true;
}

}  // namespace

json validate_recipe(const Recipe& r) {
  Session s = open_session(r, torch::Device(r.model.device));
  attach_methods(s, r);
  check_lengths(s, r);
  const auto data = task_data(s, r);
  // One training example forward and backward through the model and its methods, as the first
  // step would (a dtype or device a method cannot compute in fails here, not mid-run).
  const auto first = to_device(make_batch(data.train, {0}, s.pad_id, s.classification), s.device);
  for (auto& m : s.methods)
    if (m->needs_calibration()) m->calibrate(s.model(), [&] { return task_loss(s, first).loss; });
  set_training(s, true);
  task_loss(s, first).loss.backward();
  return {{"train_examples", data.train.size()}, {"eval_examples", data.eval.size()}};
}

namespace {

// A stream that writes nowhere: ranks other than 0 say nothing but their errors.
std::ostream& nowhere() {
  static std::ostream sink(nullptr);
  return sink;
}

// The device a rank computes on: a recipe's "cuda" is the local rank's GPU in a run of several.
torch::Device rank_device(const Recipe& r, const Launch& l) {
  torch::Device d(r.model.device);
  if (l.distributed() && d.is_cuda() && !d.has_index() && torch::cuda::is_available())
    d = torch::Device(torch::kCUDA,
                      static_cast<c10::DeviceIndex>(l.local_rank %
                                                    static_cast<int>(torch::cuda::device_count())));
  return d;
}

// The signal that stops a run at this step boundary: this process's, or in a run of several
// ranks any rank's (SIGINT before SIGTERM), so that every rank stops at the same step.
int agreed_signal(int mine, ProcessGroup& group, const torch::Device& device) {
  if (group.size() == 1) return mine;
  auto t =
      torch::tensor({static_cast<double>(mine == SIGINT), static_cast<double>(mine == SIGTERM)},
                    torch::kDouble)
          .to(device);
  group.allreduce_sum(t);
  t = t.cpu();
  return mine ? mine : t[0].item<double>() > 0 ? SIGINT : t[1].item<double>() > 0 ? SIGTERM : 0;
}

// The rows of a global batch that rank k of N takes: [k n / N, (k + 1) n / N).
std::vector<std::size_t> shard(const std::vector<std::size_t>& which, const ProcessGroup& g) {
  const auto n = which.size(), N = static_cast<std::size_t>(g.size()),
             k = static_cast<std::size_t>(g.rank());
  return {which.begin() + static_cast<std::ptrdiff_t>(k * n / N),
          which.begin() + static_cast<std::ptrdiff_t>((k + 1) * n / N)};
}

}  // namespace

json run_recipe(const Recipe& r, const RunOptions& options) {
  const auto run = r.output.dir;
  const auto recipe_text = to_yaml(r.params);
  RunOptions o = options;
  const auto device = rank_device(r, o.launch);
  auto group = ProcessGroup::join(o.launch, device, o.rendezvous_timeout);
  const bool writer = group->rank() == 0;  // rank 0 writes the run folder and speaks
  std::ostream& log = writer ? std::cerr : nowhere();
  const bool clear = check_run_folder(run, recipe_text, options, log);
  if (clear) o.resume = false;  // nothing to continue there: a fresh start
  fs::path resume_from;         // refused early when another number of ranks wrote it
  if (o.resume) {
    resume_from = latest_checkpoint(run);
    if (resume_from.empty()) throw Error(run.string() + ": no checkpoint to resume from");
    refuse_other_world_size(resume_from, *group);
  }
  StopSignals signals(o.handle_signals);

  torch::manual_seed(r.seed);
  Session s = open_session(r, device);
  std::set<const void*> seen;  // the base model's parameters, before methods change them
  std::int64_t n_model = 0;    // (tied embeddings count once)
  for (const auto& t : s.model().parameters())
    if (seen.insert(t.unsafeGetTensorImpl()).second) n_model += t.numel();
  attach_methods(s, r);
  check_lengths(s, r);
  auto data = task_data(s, r);
  const auto B = r.train.batch_size, accum = r.train.gradient_accumulation;
  if (B < group->size())
    r.params.at("train")
        .at("batch_size")
        .fail("each of the " + std::to_string(group->size()) +
              " ranks takes a share of every batch: expected at least " +
              std::to_string(group->size()) + ", got " + std::to_string(B));
  const auto per_epoch = static_cast<std::int64_t>((data.train.size() + B - 1) / B);
  const auto total = r.train.steps > 0
                         ? r.train.steps
                         : std::max<std::int64_t>(1, r.train.epochs * per_epoch / accum);
  const auto labels = s.classification ? r.task.num_labels : std::int64_t{0};
  auto evaluate_now = [&] {
    return evaluate(s, data.eval, B, r.eval.batches, r.eval.metrics, *group, labels);
  };

  // The examples of global micro-batch `index` (the same on every rank, whatever their number):
  // the data's order for the epoch, from the seed, B at a time.
  std::int64_t order_epoch = -1;  // the epoch whose permutation `order` holds
  std::vector<std::size_t> order;
  auto examples = [&](std::int64_t index) {
    const auto epoch = index / per_epoch, at = (index % per_epoch) * B;
    if (epoch != order_epoch) {
      order = shuffled(data.train.size(), r.seed, static_cast<std::uint64_t>(epoch));
      order_epoch = epoch;
    }
    std::vector<std::size_t> which;
    for (auto i = at; i < std::min<std::int64_t>(at + B, static_cast<std::int64_t>(order.size()));
         ++i)
      which.push_back(order[static_cast<std::size_t>(i)]);
    return which;
  };
  auto batch_of = [&](const std::vector<std::size_t>& which) {
    return to_device(make_batch(data.train, which, s.pad_id, s.classification), s.device);
  };

  if (o.resume) load_checkpoint_methods(s, resume_from);
  // Methods that choose what to train from data see the first batches of epoch 0 (whole, on
  // every rank: every rank chooses the same).
  for (auto& m : s.methods)
    if (m->needs_calibration() && !o.resume) {
      std::int64_t next = 0;
      m->calibrate(s.model(), [&] { return task_loss(s, batch_of(examples(next++))).loss; });
    }

  std::vector<at::Tensor> params;
  std::int64_t n_trainable = 0;
  for (auto& [name, t] : trainable(s)) {
    params.push_back(t);
    n_trainable += t.numel();
  }
  if (params.empty())
    r.methods.fail(
        "the methods leave nothing to train (none of them has parameters); add one that has");
  auto opt = make_optimizer(r.train, params);
  std::unique_ptr<dist::GradientReducer> reducer;
  if (group->size() > 1) {
    // Every rank starts from rank 0's tensors (they are equal when initialised from the seed;
    // this makes it so whatever a method draws).
    torch::NoGradGuard no_grad;
    for (auto& p : params) group->broadcast(p, 0);
    reducer = std::make_unique<dist::GradientReducer>(*group, params);
  }

  std::vector<std::string> methods_summary;
  std::vector<Method*> raw;
  for (auto& m : s.methods) raw.push_back(m.get());
  log << "graft run " << r.file.string() << ": " << s.model().config().family << " model "
      << s.loaded.path.filename().string() << ", " << data.train.size() << " train / "
      << data.eval.size() << " eval examples"
      << (data.dropped ? " (" + std::to_string(data.dropped) +
                             " records dropped: " + dropped_reason(r.task) + ")"
                       : "")
      << ", " << total << " steps"
      << (group->size() > 1 ? ", " + std::to_string(group->size()) + " ranks (" + group->backend() +
                                  ", " + std::to_string(reducer->buckets()) + " gradient bucket" +
                                  (reducer->buckets() == 1 ? "" : "s") + ")"
                            : "")
      << "\n";
  log << trainable_summary(s.model(), raw) << "\n";
  if (s.head)
    log << "classification head (trained with the methods): "
        << s.head->linear->weight.numel() + s.head->linear->bias.numel() << " params\n";
  for (auto& m : s.methods)
    if (!m->report().empty()) log << m->report() << "\n";

  Position pos;
  std::vector<json> metrics;
  json before = json::object(), extra = json::object();
  group->barrier();  // every rank has looked at the folder before rank 0 changes it
  if (clear && writer)
    for (const char* name : kRunFiles) fs::remove_all(run / name);
  if (writer) fs::create_directories(run);
  if (o.resume) {
    extra = load_checkpoint_trainer(*opt, resume_from, pos, metrics, *group);
    log << "resumed from " << resume_from.string() << " (step " << pos.step << ")\n";
  } else {
    if (writer) {
      io::write_atomically(run / "recipe.yaml", [&](std::ostream& out) { out << recipe_text; });
      write_json(run / "manifest.json", manifest(r, o, *group));
    }
    if (!data.eval.empty()) {
      before = evaluate_now();
      log << "eval before: " << metrics_line(before) << "\n";
      json line = {{"step", 0}, {"split", "eval"}};
      line.update(before);
      metrics.push_back(line);
    }
    extra["eval_before"] = before;
    extra["sample_before"] = writer ? sample(s, r) : std::string();
    if (!extra["sample_before"].get<std::string>().empty())
      log << "sample before: " << extra["sample_before"].get<std::string>() << "\n";
    if (writer) write_metrics(run / "metrics.jsonl", metrics);
  }

  const auto start = Clock::now();
  const auto first_step = pos.step;  // a resumed run times only its own steps
  std::int64_t tokens = 0;           // over all ranks
  double waiting = 0;                // for the step's sums (the reducer counts its own)
  const bool bar = o.progress && on_terminal() && writer;
  set_training(s, true);
  while (pos.step < total) {
    failpoint("step", pos.step + 1);
    set_lr(*opt, lr_at(r.train, pos.step, total));
    if (reducer)
      reducer->start_step();
    else
      opt->zero_grad();
    // This rank's share of each micro-batch of the step, and the targets of the whole step over
    // all ranks: each micro-batch's summed loss is divided by them.
    std::vector<Batch> mine;
    std::vector<std::int64_t> counts;
    std::int64_t targets = 0;
    for (std::int64_t a = 0; a < accum; ++a) {
      const auto which = shard(examples(pos.micro_batches++), *group);
      mine.push_back(which.empty() ? Batch{} : batch_of(which));
      counts.push_back(which.empty() ? 0 : task_targets(s, mine.back()));
      targets += counts.back();
    }
    if (group->size() > 1) {
      auto t = torch::tensor({static_cast<double>(targets)}, torch::kDouble).to(s.device);
      const auto t0 = Clock::now();
      group->allreduce_sum(t);
      waiting += std::chrono::duration<double>(Clock::now() - t0).count();
      targets = static_cast<std::int64_t>(t.cpu().item<double>());
    }
    const double denominator = static_cast<double>(std::max<std::int64_t>(targets, 1));
    double step_part = 0;  // this rank's share of the step's mean loss
    std::int64_t step_tokens = 0;
    for (std::int64_t a = 0; a < accum; ++a) {
      const auto& b = mine[static_cast<std::size_t>(a)];
      if (reducer) reducer->before_backward(a == accum - 1);
      if (!b.input_ids.defined()) continue;  // a short last batch left this rank nothing
      step_tokens += b.tokens;
      auto parts = task_loss(s, b);
      auto share = parts.sum / denominator;
      step_part += share.item<double>();
      share.backward();
    }
    if (reducer) reducer->finish_step();
    // The step's loss and tokens over all ranks.
    double step_loss = step_part;
    if (group->size() > 1) {
      auto t =
          torch::tensor({step_part, static_cast<double>(step_tokens)}, torch::kDouble).to(s.device);
      const auto t0 = Clock::now();
      group->allreduce_sum(t);
      waiting += std::chrono::duration<double>(Clock::now() - t0).count();
      t = t.cpu();
      step_loss = t[0].item<double>();
      step_tokens = static_cast<std::int64_t>(t[1].item<double>());
    }
    tokens += step_tokens;
    if (!std::isfinite(step_loss)) {
      if (writer) write_metrics(run / "metrics.jsonl", metrics);
      const auto ck = latest_checkpoint(run);
      throw Error("step " + std::to_string(pos.step + 1) + ": the loss is " + fixed(step_loss, 1) +
                  "; training stopped. " +
                  (ck.empty() ? std::string("No checkpoint was written yet. ")
                              : "The last good checkpoint is " + ck.string() + ". ") +
                  "Lower train.lr, add train.warmup_steps or set train.max_grad_norm.");
    }
    if (r.train.max_grad_norm > 0) torch::nn::utils::clip_grad_norm_(params, r.train.max_grad_norm);
    opt->step();
    ++pos.step;
    pos.window_loss += step_loss;
    ++pos.window_steps;

    const double elapsed = std::chrono::duration<double>(Clock::now() - start).count();
    const double tok_s = elapsed > 0 ? tokens / elapsed : 0;
    const auto done_here = pos.step - first_step;
    const double eta = done_here > 0 ? elapsed / done_here * (total - pos.step) : 0;
    if (pos.step % r.train.log_every == 0 || pos.step == total) {
      json line = {{"step", pos.step},
                   {"split", "train"},
                   {"loss", pos.window_loss / pos.window_steps},
                   {"lr", lr_at(r.train, pos.step - 1, total)}};
      metrics.push_back(line);
      if (!bar)
        log << "step " << pos.step << "/" << total << "  loss "
            << fixed(pos.window_loss / pos.window_steps, 4) << "  "
            << static_cast<std::int64_t>(tok_s) << " tok/s  eta " << duration(eta) << "\n";
      pos.window_loss = 0;
      pos.window_steps = 0;
    }
    if (bar) {
      const int width = 30, filled = static_cast<int>(width * pos.step / total);
      log << "\r[" << std::string(filled, '#') << std::string(width - filled, '.') << "] "
          << pos.step << "/" << total << "  loss " << fixed(step_loss, 4) << "  "
          << static_cast<std::int64_t>(tok_s) << " tok/s  eta " << duration(eta) << "   "
          << std::flush;
    }
    if (r.eval.every > 0 && pos.step % r.eval.every == 0 && pos.step < total &&
        !data.eval.empty()) {
      auto m = evaluate_now();
      json line = {{"step", pos.step}, {"split", "eval"}};
      line.update(m);
      metrics.push_back(line);
      if (bar) log << "\n";
      log << "eval at step " << pos.step << ": " << metrics_line(m) << "\n";
      set_training(s, true);
    }
    if (writer) write_metrics(run / "metrics.jsonl", metrics);
    if (o.on_step) o.on_step(pos.step);
    const bool stop_here = o.stop_at > 0 && pos.step == o.stop_at && pos.step < total;
    const int sig = pos.step < total ? agreed_signal(signals.pending(), *group, s.device) : 0;
    if ((r.checkpoint.every > 0 && pos.step % r.checkpoint.every == 0) || stop_here || sig)
      save_checkpoint(s, *opt, pos, metrics, extra, run, r.checkpoint.keep, *group);
    if (sig) {
      if (bar) log << "\n";
      log << "interrupted (" << (sig == SIGINT ? "SIGINT" : "SIGTERM") << ") after step "
          << pos.step << "; the checkpoint is " << latest_checkpoint(run).string()
          << "; continue with the same command and --resume\n";
      return {{"interrupted_at", pos.step}, {"signal", sig}};
    }
    if (stop_here) {
      if (bar) log << "\n";
      log << "stopped after step " << pos.step << " as asked (--stop-at); continue with --resume\n";
      return {{"stopped_at", pos.step}};
    }
  }
  if (bar) log << "\n";
  const double wall = std::chrono::duration<double>(Clock::now() - start).count();

  json after = json::object();
  if (!data.eval.empty()) {
    after = evaluate_now();
    json line = {{"step", pos.step}, {"split", "eval"}};
    line.update(after);
    metrics.push_back(line);
    log << "eval before: " << metrics_line(extra.value("eval_before", json::object())) << "\n";
    log << "eval after:  " << metrics_line(after) << "\n";
  }
  const auto sample_after = writer ? sample(s, r) : std::string();
  if (!sample_after.empty()) {
    log << "sample before: " << extra.value("sample_before", std::string()) << "\n";
    log << "sample after:  " << sample_after << "\n";
  }
  const double communication = waiting + (reducer ? reducer->waiting_seconds() : 0.0);
  json summary = {{"steps", pos.step},
                  {"train_examples", data.train.size()},
                  {"eval_examples", data.eval.size()},
                  {"trainable_parameters", n_trainable},
                  {"model_parameters", n_model},
                  {"eval_before", extra.value("eval_before", json::object())},
                  {"eval_after", after},
                  {"sample_before", extra.value("sample_before", std::string())},
                  {"sample_after", sample_after},
                  {"wall_seconds", wall},
                  {"tokens_per_second", wall > 0 ? tokens / wall : 0.0},
                  {"peak_memory_mib", peak_memory_mib()},
                  {"world_size", group->size()},
                  {"communication_seconds", communication}};
  if (!writer) return summary;
  write_metrics(run / "metrics.jsonl", metrics);
  if (r.output.save_adapter) {
    save_adapter(run / "adapter", s.model(), raw);
    save_head(s, run / "adapter");
  }
  write_json(run / "summary.json", summary);
  log << "run folder: " << run.string() << "\n";
  return summary;
}

json evaluate_recipe(const Recipe& r, const std::vector<std::string>& adapters) {
  torch::manual_seed(r.seed);
  Session s = open_session(r, torch::Device(r.model.device));
  for (const auto& dir : adapters)
    for (auto& m : load_adapter(dir, s.model())) s.methods.push_back(std::move(m));
  if (s.classification && !s.model_head) {
    s.head = TaskHead(s.model().config().hidden_size, r.task.num_labels);
    s.head->to(s.device);
    bool found = false;
    for (const auto& dir : adapters) {
      found |= fs::exists(fs::path(dir) / kHeadFile);
      load_head(s, dir);
    }
    if (!found)
      std::cerr << "note: no " << kHeadFile
                << " among the adapters: the classification head is "
                   "untrained (random)\n";
  }
  auto data = task_data(s, r);
  const auto& eval = data.eval.empty() ? data.train : data.eval;
  const auto alone = ProcessGroup::join(Launch{}, s.device, {});
  const auto labels = s.classification ? r.task.num_labels : std::int64_t{0};
  return {{"metrics",
           evaluate(s, eval, r.train.batch_size, r.eval.batches, r.eval.metrics, *alone, labels)},
          {"examples", eval.size()},
          {"split", data.eval.empty() ? "train" : "eval"}};
}

}  // namespace graft
