// Llama forward throughput at a realistic shape with random weights, reported against a plain
// matrix multiply measured in the same run on the same threads.
//
//   graft_bench [--d 512] [--layers 8] [--heads 8] [--ffn 1376] [--seq 256] [--batch 8]
//               [--threads N] [--repeat 5] [--matmul-only] [--hooks]
//   graft_bench --train METHODS [--bf16] ...   the training step (bench_train.cpp)
//   graft_bench --routing ...   a batch routed over 1, 4, 16 LoRA adapters (bench_routing.cpp)
//
// Prints tokens/s, the forward's achieved GFLOP/s, the plain matmuls' GFLOP/s and their ratio.
// With --hooks, also the cost of the hook machinery with nothing attached: the model's forward
// against the same computation written out here without any site (hooks compiled out).
#include <graft/load.h>
#include <graft/model.h>
#include <torch/torch.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <string>
#include <vector>

#include "bench_routing.h"
#include "bench_train.h"
#include "models/common.h"
#include "models/families.h"
#include "random_model.h"
#include "timing.h"

namespace {

using graft::bench::median_seconds;
using graft::models::apply_rope;
using graft::models::attend;
using graft::models::positions_from_mask;
using graft::models::rope_tables;
using graft::models::split_heads;

at::Tensor rms(const at::Tensor& x, const at::Tensor& w, double eps) {
  return w * (x * torch::rsqrt(x.pow(2).mean(-1, true) + eps));
}

// The llama forward with every site compiled out: the same weights and building blocks, plain
// torch::linear calls, no hook checks.
at::Tensor direct_forward(graft::Model& m, const at::Tensor& ids) {
  const auto& c = m.config();
  auto p = m.named_parameters();
  auto x = torch::embedding(p["embed.weight"], ids);
  auto mask = torch::ones_like(ids);
  auto [cos, sin] = rope_tables(positions_from_mask(mask, ids.size(1)), c.head_dim, c.rope_theta);
  for (std::int64_t l = 0; l < c.num_layers; ++l) {
    const std::string L = "layers." + std::to_string(l) + ".";
    auto h = rms(x, p[L + "attn_norm.weight"], c.norm_eps);
    auto q =
        apply_rope(split_heads(torch::linear(h, p[L + "attn.q.weight"]), c.num_heads, c.head_dim),
                   cos, sin, c.rope_style);
    auto k = apply_rope(
        split_heads(torch::linear(h, p[L + "attn.k.weight"]), c.num_kv_heads, c.head_dim), cos, sin,
        c.rope_style);
    auto v = split_heads(torch::linear(h, p[L + "attn.v.weight"]), c.num_kv_heads, c.head_dim);
    x = x + torch::linear(attend(q, k, v, mask, true), p[L + "attn.o.weight"]);
    h = rms(x, p[L + "ffn_norm.weight"], c.norm_eps);
    auto a = torch::silu(torch::linear(h, p[L + "ffn.gate.weight"])) *
             torch::linear(h, p[L + "ffn.up.weight"]);
    x = x + torch::linear(a, p[L + "ffn.down.weight"]);
  }
  x = rms(x, p["norm.weight"], c.norm_eps);
  return torch::linear(x, p["head.weight"]);
}

}  // namespace

int main(int argc, char** argv) {
  graft::wait_passively(argv);
  std::setvbuf(stdout, nullptr, _IOLBF, 0);  // each figure as it is measured, even into a pipe
  std::int64_t d = 512, layers = 8, heads = 8, ffn = 1376, vocab = 32000, seq = 256, batch = 8;
  int threads = 0, repeat = 0;
  std::string train;
  bool bf16 = false;
  bool matmul_only = false, hooks = false, routing = false;
  for (int i = 1; i < argc; ++i) {
    auto next = [&](const char* name) -> long long {
      if (i + 1 >= argc) {
        std::fprintf(stderr, "graft_bench: %s needs a value\n", name);
        std::exit(2);
      }
      return std::atoll(argv[++i]);
    };
    std::string a = argv[i];
    if (a == "--d")
      d = next("--d");
    else if (a == "--layers")
      layers = next("--layers");
    else if (a == "--heads")
      heads = next("--heads");
    else if (a == "--ffn")
      ffn = next("--ffn");
    else if (a == "--vocab")
      vocab = next("--vocab");
    else if (a == "--bf16")
      bf16 = true;
    else if (a == "--train") {
      if (i + 1 >= argc) {
        std::fprintf(stderr, "graft_bench: --train needs a value\n");
        return 2;
      }
      train = argv[++i];
    } else if (a == "--seq")
      seq = next("--seq");
    else if (a == "--batch")
      batch = next("--batch");
    else if (a == "--threads")
      threads = static_cast<int>(next("--threads"));
    else if (a == "--repeat")
      repeat = static_cast<int>(next("--repeat"));
    else if (a == "--matmul-only")
      matmul_only = true;
    else if (a == "--hooks")
      hooks = true;
    else if (a == "--routing")
      routing = true;
    else {
      std::fprintf(stderr, "graft_bench: unknown option %s\n", a.c_str());
      return 2;
    }
  }
  for (auto [name, v] : {std::pair{"--d", d},
                         {"--layers", layers},
                         {"--heads", heads},
                         {"--ffn", ffn},
                         {"--vocab", vocab},
                         {"--seq", seq},
                         {"--batch", batch}})
    if (v < 1) {
      std::fprintf(stderr, "graft_bench: %s must be at least 1\n", name);
      return 2;
    }
  if (d % heads != 0) {
    std::fprintf(stderr, "graft_bench: --heads must divide --d\n");
    return 2;
  }
  graft::set_threads(threads);
  if (routing) {
    graft::bench::RoutingBenchOptions o;
    o.d = d, o.layers = layers, o.heads = heads, o.ffn = ffn, o.vocab = vocab;
    bool seq_given = false, batch_given = false;
    for (int i = 1; i < argc; ++i) {
      seq_given |= std::strcmp(argv[i], "--seq") == 0;
      batch_given |= std::strcmp(argv[i], "--batch") == 0;
    }
    if (seq_given) o.seq = seq;
    if (batch_given) o.batch = batch;
    if (repeat > 0) o.repeat = repeat;
    return graft::bench::routing_bench(o);
  }
  if (!train.empty()) {
    graft::bench::TrainBenchOptions o;
    o.methods = train;
    o.d = d, o.layers = layers, o.heads = heads, o.ffn = ffn, o.vocab = vocab, o.seq = seq;
    o.batch = batch;
    o.repeat = repeat > 0 ? repeat : 3;
    o.bf16 = bf16;
    return graft::bench::train_bench(o);
  }
  if (repeat <= 0) repeat = 5;
  torch::NoGradGuard no_grad;
  const std::int64_t tokens = batch * seq;

  // The reference: the plain matrix products a forward of this shape performs (per layer q, k,
  // v, o, gate, up, down and attention's two batched products; then the LM head), each timed on
  // its own. Their total time is what the forward would take if nothing but matmuls cost time.
  const std::int64_t hd = d / heads;
  struct Product {
    const char* name;
    at::Tensor a, b;
    double count;
  };
  std::vector<Product> products = {
      {"q/k/v/o", torch::randn({tokens, d}), torch::randn({d, d}), 4.0 * layers},
      {"gate/up", torch::randn({tokens, d}), torch::randn({d, ffn}), 2.0 * layers},
      {"down", torch::randn({tokens, ffn}), torch::randn({ffn, d}), 1.0 * layers},
      {"scores", torch::randn({batch * heads, seq, hd}), torch::randn({batch * heads, hd, seq}),
       1.0 * layers},
      {"mix", torch::randn({batch * heads, seq, seq}), torch::randn({batch * heads, seq, hd}),
       1.0 * layers},
      {"head", torch::randn({tokens, d}), torch::randn({d, vocab}), 1.0},
  };
  double mm_flops = 0, mm_s = 0;
  std::printf("threads            %d\n", torch::get_num_threads());
  for (auto& p : products) {
    const double s = median_seconds(repeat, [&] { auto c = torch::matmul(p.a, p.b); });
    const double flops = 2.0 * p.a.numel() * p.b.size(-1);
    std::printf("matmul %-11s %s x %s: %.1f GFLOP/s\n", p.name, c10::str(p.a.sizes()).c_str(),
                c10::str(p.b.sizes()).c_str(), flops / s / 1e9);
    mm_flops += p.count * flops;
    mm_s += p.count * s;
  }
  const double mm_gflops = mm_flops / mm_s / 1e9;
  std::printf("matmul total       %.1f GFLOP/s\n", mm_gflops);
  if (matmul_only) return 0;

  auto model = graft::bench::random_llama(d, layers, heads, ffn, vocab, seq);
  const auto& c = model->config();
  auto ids = torch::randint(c.vocab_size, {batch, seq}, torch::kLong);
  graft::ForwardInput in{ids, {}, {}, {}};
  std::fprintf(stderr, "(timing the forward: %d runs after a warm-up)\n", repeat);
  const double fwd_s = median_seconds(repeat, [&] { model->forward(in, nullptr); });

  const double fwd_gflops = mm_flops / fwd_s / 1e9;  // the same products, inside the forward
  std::printf("llama forward      d %lld, %lld layers, %lld heads, seq %lld, batch %lld: %.2f ms\n",
              (long long)d, (long long)layers, (long long)heads, (long long)seq, (long long)batch,
              fwd_s * 1e3);
  std::printf("throughput         %.0f tokens/s\n", tokens / fwd_s);
  if (hooks) {
    // Interleave the two so that drift in the machine's speed affects both alike.
    std::vector<double> with, without;
    auto a = model->forward(in, nullptr).logits;
    auto b = direct_forward(*model, ids);
    if (!torch::allclose(a, b, 1e-4, 1e-5)) {
      std::fprintf(stderr, "graft_bench: the direct forward disagrees with the model\n");
      return 1;
    }
    for (int i = 0; i < repeat; ++i) {
      with.push_back(median_seconds(1, [&] { model->forward(in, nullptr); }));
      without.push_back(median_seconds(1, [&] { direct_forward(*model, ids); }));
    }
    std::sort(with.begin(), with.end());
    std::sort(without.begin(), without.end());
    const double w = with[with.size() / 2], wo = without[without.size() / 2];
    std::printf(
        "hook machinery     no hooks attached %.2f ms, sites compiled out %.2f ms: ratio %.3f\n",
        w * 1e3, wo * 1e3, w / wo);
  }
  std::printf("achieved           %.1f GFLOP/s = %.2f of the plain matmuls' %.1f GFLOP/s\n",
              fwd_gflops, fwd_gflops / mm_gflops, mm_gflops);
  return 0;
}
