// Llama forward throughput at a realistic shape with random weights, reported against a plain
// matrix multiply measured in the same run on the same threads.
//
//   graft_bench [--d 512] [--layers 8] [--heads 8] [--seq 256] [--batch 8] [--threads N]
//               [--repeat 5] [--matmul-only]
//
// Prints tokens/s, the forward's achieved GFLOP/s, the matmul's GFLOP/s and their ratio.
#include <graft/load.h>
#include <graft/model.h>

#include <torch/torch.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <string>
#include <vector>

#include "models/common.h"
#include "models/families.h"

namespace {

using Clock = std::chrono::steady_clock;

// Median wall time of `repeat` runs of `fn`, after one warm-up run.
template <typename F>
double median_seconds(int repeat, F&& fn) {
  fn();
  std::vector<double> t;
  for (int i = 0; i < repeat; ++i) {
    auto start = Clock::now();
    fn();
    t.push_back(std::chrono::duration<double>(Clock::now() - start).count());
  }
  std::sort(t.begin(), t.end());
  return t[t.size() / 2];
}

}  // namespace

int main(int argc, char** argv) {
  std::int64_t d = 512, layers = 8, heads = 8, seq = 256, batch = 8;
  int threads = 0, repeat = 5;
  bool matmul_only = false;
  for (int i = 1; i < argc; ++i) {
    auto next = [&](const char* name) -> long long {
      if (i + 1 >= argc) {
        std::fprintf(stderr, "graft_bench: %s needs a value\n", name);
        std::exit(2);
      }
      return std::atoll(argv[++i]);
    };
    std::string a = argv[i];
    if (a == "--d") d = next("--d");
    else if (a == "--layers") layers = next("--layers");
    else if (a == "--heads") heads = next("--heads");
    else if (a == "--seq") seq = next("--seq");
    else if (a == "--batch") batch = next("--batch");
    else if (a == "--threads") threads = static_cast<int>(next("--threads"));
    else if (a == "--repeat") repeat = static_cast<int>(next("--repeat"));
    else if (a == "--matmul-only") matmul_only = true;
    else {
      std::fprintf(stderr, "graft_bench: unknown option %s\n", a.c_str());
      return 2;
    }
  }
  graft::set_threads(threads);
  torch::NoGradGuard no_grad;
  const std::int64_t tokens = batch * seq;
  const std::int64_t ffn = ((8 * d / 3 + 63) / 64) * 64;  // llama's SwiGLU width, rounded

  // The reference: the forward's dominant product, [tokens, d] x [d, ffn].
  auto a = torch::randn({tokens, d}), b = torch::randn({d, ffn});
  const double mm_flops = 2.0 * tokens * d * ffn;
  const double mm_s = median_seconds(repeat, [&] { auto c = torch::mm(a, b); });
  const double mm_gflops = mm_flops / mm_s / 1e9;
  std::printf("threads            %d\n", torch::get_num_threads());
  std::printf("matmul             [%lld x %lld] x [%lld x %lld]: %.1f GFLOP/s (%.2f ms)\n",
              (long long)tokens, (long long)d, (long long)d, (long long)ffn, mm_gflops, mm_s * 1e3);
  if (matmul_only) return 0;

  graft::ModelConfig c;
  c.family = "llama";
  c.vocab_size = 32000;
  c.hidden_size = d;
  c.num_layers = layers;
  c.num_heads = c.num_kv_heads = heads;
  c.head_dim = d / heads;
  c.intermediate_size = ffn;
  c.max_positions = seq;
  c.hidden_act = "silu";
  auto model = graft::models::make_model(c);
  graft::models::init_parameters(*model, 1);
  model->eval();
  auto ids = torch::randint(c.vocab_size, {batch, seq}, torch::kLong);
  graft::ForwardInput in{ids, {}, {}, {}};
  const double fwd_s = median_seconds(repeat, [&] { model->forward(in, nullptr); });

  // Matmul FLOPs of one forward: projections, the LM head, and attention's two products.
  const double per_token_linear = layers * (4.0 * d * d + 3.0 * d * ffn) + 1.0 * d * c.vocab_size;
  const double attention = layers * 2.0 * 2.0 * batch * heads * seq * seq * c.head_dim;
  const double fwd_flops = 2.0 * per_token_linear * tokens + attention;
  const double fwd_gflops = fwd_flops / fwd_s / 1e9;
  std::printf("llama forward      d %lld, %lld layers, %lld heads, seq %lld, batch %lld: %.2f ms\n",
              (long long)d, (long long)layers, (long long)heads, (long long)seq, (long long)batch,
              fwd_s * 1e3);
  std::printf("throughput         %.0f tokens/s\n", tokens / fwd_s);
  std::printf("achieved           %.1f GFLOP/s = %.2f of the matmul's\n", fwd_gflops, fwd_gflops / mm_gflops);
  return 0;
}
