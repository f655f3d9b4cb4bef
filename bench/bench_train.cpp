// The training step (data, forward, loss, backward, optimizer) at a realistic llama shape with
// random weights, for one method or hybrid, reported against plain matrix multiplies of the very
// products the step performed, measured in the same run on the same threads.
//
//   graft_bench --train lora|full|qlora|bottleneck|prefix|"[{name: ia3}, ...]"
//               [--d 512] [--layers 8] [--heads 8] [--ffn 1376] [--vocab 32000] [--seq 256]
//               [--batch 8] [--threads N] [--repeat 3]
//
// The step is the trainer's own: make_batch, causal_lm_loss, backward, AdamW. Its FLOPs are
// counted, not estimated: one step runs with an observer on libtorch's dispatcher that records
// the shape of every matrix product (mm, addmm, bmm, baddbmm) in the forward and the backward;
// those products are then timed one by one as plain products of contiguous random matrices of
// the same dtype (bfloat16 ones under --bf16). The
// ratio of the two rates says how close the step comes to costing nothing but its products.
// Peak RSS is the process's high-water mark after the timed steps, before the reference
// matrices are made. The per-phase breakdown comes from the named scopes of the model's forward
// (RECORD_USER_SCOPE "graft::*"), timed exclusively of the scopes nested in them.
#include "bench_train.h"

#include <ATen/record_function.h>
#include <dlfcn.h>
#include <graft/data.h>
#include <graft/load.h>
#include <graft/method.h>
#include <graft/model.h>
#include <graft/plugin.h>
#include <graft/recipe.h>
#include <malloc.h>
#include <sys/resource.h>
#include <torch/torch.h>

#include <algorithm>
#include <cstdio>
#include <fstream>
#include <map>
#include <memory>
#include <string>
#include <tuple>
#include <vector>

#include "models/common.h"
#include "models/families.h"
#include "random_model.h"
#include "recipe/loss.h"
#include "timing.h"

namespace graft::bench {
namespace {

// The methods the table compares, as a recipe's `methods:` list.
const std::map<std::string, std::string> kPresets = {
    {"lora", "[{name: lora, r: 8, alpha: 16, targets: [attn.q, attn.v]}]"},
    {"full", "[{name: full}]"},
    {"qlora",
     "[{name: quantize, targets: [all-linear]}, {name: lora, r: 8, alpha: 16, targets: "
     "[all-linear]}]"},
    {"bottleneck", "[{name: bottleneck, targets: [ffn.out], reduction_factor: 16}]"},
    {"prefix", "[{name: prefix_tuning, num_virtual_tokens: 30}]"},
};

// --- the per-scope timer: exclusive wall time of each "graft::" scope on this thread ---------

struct ScopeContext : at::ObserverContext {
  Clock::time_point start;
  double nested = 0;  // seconds spent in scopes inside this one
  ScopeContext* parent = nullptr;
};

thread_local ScopeContext* current_scope = nullptr;
std::map<std::string, double> scope_seconds;  // written by the main thread only

bool is_graft_scope(const at::RecordFunction& fn) {
  return std::string(fn.name()).rfind("graft::", 0) == 0;
}

std::unique_ptr<at::ObserverContext> scope_start(const at::RecordFunction& fn) {
  if (!is_graft_scope(fn)) return nullptr;
  auto c = std::make_unique<ScopeContext>();
  c->parent = current_scope;
  current_scope = c.get();
  c->start = Clock::now();
  return c;
}

void scope_end(const at::RecordFunction& fn, at::ObserverContext* ctx) {
  if (!ctx) return;
  auto* c = static_cast<ScopeContext*>(ctx);
  const double s = seconds_since(c->start);
  scope_seconds[std::string(fn.name()).substr(7)] += s - c->nested;
  if (c->parent) c->parent->nested += s;
  current_scope = c->parent;
}

// --- the product counter: every matrix product the dispatcher runs, by shape -----------------

struct Product {
  std::int64_t batch, m, k, n;  // batch 0: a plain [m, k] x [k, n] product
  at::ScalarType dtype;
  bool operator<(const Product& o) const {
    return std::tie(batch, m, k, n, dtype) < std::tie(o.batch, o.m, o.k, o.n, o.dtype);
  }
  double flops() const { return 2.0 * std::max<std::int64_t>(batch, 1) * m * k * n; }
};

std::map<Product, std::int64_t> products;

// A product call in flight. Autocast's kernel for a product calls the product again with its
// operands cast (both calls pass the dispatcher): only a call with no product inside counts.
struct ProductCall : at::ObserverContext {
  Product product{};
  bool nested = false;
  ProductCall* parent = nullptr;
};
thread_local ProductCall* current_product = nullptr;

std::unique_ptr<at::ObserverContext> product_start(const at::RecordFunction& fn) {
  const std::string name = fn.name();
  // The operands: mm(a, b), bmm(a, b); addmm(c, a, b), baddbmm(c, a, b) and their in-place
  // forms (the chunked loss accumulates the head's weight gradient with addmm_).
  std::size_t first;
  if (name == "aten::mm" || name == "aten::bmm")
    first = 0;
  else if (name == "aten::addmm" || name == "aten::baddbmm" || name == "aten::addmm_" ||
           name == "aten::baddbmm_")
    first = 1;
  else
    return nullptr;
  const auto inputs = fn.inputs();
  if (inputs.size() < first + 2 || !inputs[first].isTensor() || !inputs[first + 1].isTensor())
    return nullptr;
  const auto& ta = inputs[first].toTensor();
  const auto a = ta.sizes(), b = inputs[first + 1].toTensor().sizes();
  auto call = std::make_unique<ProductCall>();
  call->product = a.size() == 2 ? Product{0, a[0], a[1], b[1], ta.scalar_type()}
                                : Product{a[0], a[1], a[2], b[2], ta.scalar_type()};
  if (current_product) current_product->nested = true;
  call->parent = current_product;
  current_product = call.get();
  return call;
}

void product_end(const at::RecordFunction&, at::ObserverContext* ctx) {
  if (!ctx) return;
  auto* call = static_cast<ProductCall*>(ctx);
  if (!call->nested) ++products[call->product];
  current_product = call->parent;
}

// --- the step -------------------------------------------------------------------------------

double peak_rss_mib() {
  rusage u{};
  getrusage(RUSAGE_SELF, &u);
  return static_cast<double>(u.ru_maxrss) / 1024.0;
}

// tcmalloc's statistics call, when tcmalloc is the process's allocator (graft links it;
// scripts/bench.sh runs this benchmark with and without it).
using NumericProperty = int (*)(const char*, std::size_t*);
NumericProperty tcmalloc_property() {
  return reinterpret_cast<NumericProperty>(
      dlsym(RTLD_DEFAULT, "MallocExtension_GetNumericProperty"));
}

// Bytes in live allocations now (what RSS would be without the allocator's retained memory).
double live_heap_mib() {
  if (auto property = tcmalloc_property()) {
    std::size_t bytes = 0;
    property("generic.current_allocated_bytes", &bytes);
    return static_cast<double>(bytes) / 1048576.0;
  }
  const auto m = mallinfo2();
  return static_cast<double>(m.uordblks + m.hblkhd) / 1048576.0;
}

// The largest live heap seen at any backward node of the counted step.
double peak_live_mib = 0;

std::unique_ptr<at::ObserverContext> sample_heap(const at::RecordFunction&) {
  peak_live_mib = std::max(peak_live_mib, live_heap_mib());
  return nullptr;
}

double rss_now_mib() {
  std::ifstream statm("/proc/self/statm");
  long pages = 0, resident = 0;
  statm >> pages >> resident;
  return static_cast<double>(resident) * static_cast<double>(sysconf(_SC_PAGESIZE)) / 1048576.0;
}

struct StepTimes {
  double data = 0, forward = 0, backward = 0, optimizer = 0;
  double total() const { return data + forward + backward + optimizer; }
};

}  // namespace

int train_bench(const TrainBenchOptions& o) {
  const auto preset = kPresets.find(o.methods);
  const std::string methods_yaml = preset != kPresets.end() ? preset->second : o.methods;
  const auto methods = read_yaml_text(methods_yaml, "--train");
  if (methods.kind() != Params::Kind::list) {
    std::fprintf(stderr,
                 "graft_bench: --train takes lora, full, qlora, bottleneck, prefix or a YAML "
                 "list of methods\n");
    return 2;
  }

  // Room for learned prefixes beyond the sequence.
  auto model =
      random_llama(o.d, o.layers, o.heads, o.ffn, o.vocab, std::max<std::int64_t>(o.seq, 2048));
  for (auto& p : model->parameters()) p.set_requires_grad(false);

  load_plugins();
  std::vector<std::unique_ptr<Method>> attached;
  std::vector<at::Tensor> trainable;
  std::int64_t trainable_count = 0;
  for (const auto& item : methods.items()) {
    attached.push_back(make_method(item.at("name").as_string(), item));
    attached.back()->attach(*model);
  }
  for (auto& m : attached) {
    m->set_training(true);
    for (auto& [name, t] : m->trainable_parameters()) {
      trainable.push_back(t);
      trainable_count += t.numel();
    }
  }
  model->train();
  torch::optim::AdamW opt(trainable, torch::optim::AdamWOptions(1e-4).weight_decay(0.0));

  // The trainer's batches: token sequences made into a padded batch with labels.
  std::vector<Example> examples(o.batch);
  std::vector<std::size_t> rows;
  for (std::int64_t r = 0; r < o.batch; ++r) {
    auto ids = torch::randint(o.vocab, {o.seq}, torch::kLong);
    examples[r].ids.assign(ids.data_ptr<std::int64_t>(), ids.data_ptr<std::int64_t>() + o.seq);
    examples[r].labels = examples[r].ids;
    rows.push_back(r);
  }
  const double setup_rss = rss_now_mib();

  auto step = [&](StepTimes& t) {
    auto start = Clock::now();
    const auto batch = make_batch(examples, rows, 0, false);
    t.data += seconds_since(start);
    start = Clock::now();
    at::Tensor loss;
    {
      Autocast autocast(o.bf16, torch::kCPU);
      loss = causal_lm_loss(*model, batch).loss;
    }
    t.forward += seconds_since(start);
    start = Clock::now();
    loss.backward();
    t.backward += seconds_since(start);
    start = Clock::now();
    opt.step();
    opt.zero_grad();
    t.optimizer += seconds_since(start);
  };

  std::printf("threads            %d\n", torch::get_num_threads());
  std::printf("allocator          %s\n", tcmalloc_property() ? "tcmalloc" : "glibc malloc");
  std::printf("methods            %s\n", methods_yaml.c_str());
  std::printf("precision          %s\n", o.bf16 ? "bf16 autocast, float32 weights" : "float32");
  std::printf(
      "shape              d %lld, %lld layers, %lld heads, ffn %lld, vocab %lld, batch %lld x "
      "seq %lld\n",
      (long long)o.d, (long long)o.layers, (long long)o.heads, (long long)o.ffn, (long long)o.vocab,
      (long long)o.batch, (long long)o.seq);
  std::printf("trainable          %lld parameters\n", (long long)trainable_count);

  StepTimes warm;
  step(warm);  // the first step allocates the optimizer's state
  // The timed steps, with the scope timer on (it reacts to graft's scopes only).
  auto scope_handle = at::addGlobalCallback(
      at::RecordFunctionCallback(scope_start, scope_end).scopes({at::RecordScope::USER_SCOPE}));
  StepTimes sum;
  std::vector<double> totals;
  for (int i = 0; i < o.repeat; ++i) {
    StepTimes t;
    step(t);
    totals.push_back(t.total());
    sum.data += t.data, sum.forward += t.forward, sum.backward += t.backward;
    sum.optimizer += t.optimizer;
  }
  at::removeCallback(scope_handle);
  const double peak = peak_rss_mib();
  const double step_s = median(totals);

  // One step more with the product counter on.
  auto count_handle = at::addGlobalCallback(
      at::RecordFunctionCallback(product_start, product_end)
          .needsInputs(true)
          .scopes({at::RecordScope::FUNCTION, at::RecordScope::BACKWARD_FUNCTION}));
  StepTimes counted;
  step(counted);
  at::removeCallback(count_handle);

  // And one with the heap sampled: after the forward (the activations kept for the backward)
  // and at every backward node.
  const double heap_before = live_heap_mib();
  double heap_forward = 0;
  {
    const auto batch = make_batch(examples, rows, 0, false);
    at::Tensor loss;
    {
      Autocast autocast(o.bf16, torch::kCPU);
      loss = causal_lm_loss(*model, batch).loss;
    }
    heap_forward = live_heap_mib();
    auto handle = at::addGlobalCallback(
        at::RecordFunctionCallback(sample_heap).scopes({at::RecordScope::BACKWARD_FUNCTION}));
    loss.backward();
    at::removeCallback(handle);
    opt.step();
    opt.zero_grad();
  }
  double step_flops = 0;
  for (const auto& [p, n] : products) step_flops += n * p.flops();

  // The same products as plain products of contiguous matrices.
  double plain_s = 0;
  for (const auto& [p, n] : products) {
    const auto type = torch::TensorOptions().dtype(p.dtype);
    auto plain = [&](at::Tensor a, at::Tensor b) {
      return median_seconds(o.repeat,
                            [&] { auto r = p.batch == 0 ? torch::mm(a, b) : torch::bmm(a, b); });
    };
    const double s = p.batch == 0
                         ? plain(torch::randn({p.m, p.k}, type), torch::randn({p.k, p.n}, type))
                         : plain(torch::randn({p.batch, p.m, p.k}, type),
                                 torch::randn({p.batch, p.k, p.n}, type));
    plain_s += n * s;
  }

  const double tokens = static_cast<double>(o.batch * o.seq);
  std::printf("step               %.2f ms (median of %d)\n", step_s * 1e3, o.repeat);
  std::printf("throughput         %.0f tokens/s\n", tokens / step_s);
  std::printf("products           %zu shapes, %.1f GFLOP per step\n", products.size(),
              step_flops / 1e9);
  std::printf("achieved           %.1f GFLOP/s = %.2f of the plain products' %.1f GFLOP/s\n",
              step_flops / step_s / 1e9, plain_s / step_s, step_flops / plain_s / 1e9);
  std::printf(
      "peak RSS           %.0f MiB (model, methods and batch: %.0f MiB before the first "
      "step)\n",
      peak, setup_rss);

  std::printf(
      "live heap          %.0f MiB between steps, +%.0f MiB after the forward, "
      "+%.0f MiB at most in the backward\n",
      heap_before, heap_forward - heap_before, peak_live_mib - heap_before);

  // The breakdown, as shares of the mean step.
  const double mean_step = sum.total() / o.repeat;
  auto row = [&](const char* name, double seconds) {
    std::printf("  %-26s %8.1f ms  %5.1f%%\n", name, seconds / o.repeat * 1e3,
                100.0 * seconds / o.repeat / mean_step);
  };
  auto scope = [&](const char* name) {
    auto it = scope_seconds.find(name);
    return it == scope_seconds.end() ? 0.0 : it->second;
  };
  double scoped = 0;
  for (const auto& [name, s] : scope_seconds) scoped += s;
  std::printf("breakdown          (mean of %d steps, %.2f ms)\n", o.repeat, mean_step * 1e3);
  row("data (make_batch)", sum.data);
  row("embedding", scope("embedding"));
  row("norms", scope("norm"));
  row("attention projections", scope("attention_block"));
  row("rotary embeddings", scope("rope"));
  row("attention (scores, mix)", scope("attention"));
  row("feed-forward", scope("ffn_block"));
  row("LM head and loss", scope("head") + scope("loss"));
  row("forward, other", sum.forward - scoped);
  row("backward", sum.backward);
  row("optimizer", sum.optimizer);
  return 0;
}

}  // namespace graft::bench
