// graft_bench --routing: one batch routed row by row over 1, 4 and 16 LoRA adapters
// (AdapterSet::route), against the same batch under one adapter and under none, all measured in
// the same run on the same model and threads.
#include "bench_routing.h"

#include <graft/adapter.h>
#include <graft/adapter_set.h>
#include <graft/plugin.h>
#include <torch/torch.h>
#include <unistd.h>

#include <cstdio>
#include <filesystem>
#include <string>
#include <vector>

#include "random_model.h"
#include "timing.h"

namespace graft::bench {

int routing_bench(const RoutingBenchOptions& o) {
  load_plugins();
  auto model = random_llama(o.d, o.layers, o.heads, o.ffn, o.vocab, o.seq);
  const auto& c = model->config();

  // 16 LoRA adapters (r 8 on every projection but the head), each saved and loaded by name.
  const auto dir = std::filesystem::temp_directory_path() /
                   ("graft-bench-routing-" + std::to_string(::getpid()));
  constexpr int kAdapters = 16;
  auto settings = Params::map("bench");
  settings.set("r", Params::scalar("8"));
  settings.set("targets", Params::scalar("all-linear"));
  AdapterSet set(*model);
  for (int i = 0; i < kAdapters; ++i) {
    auto lora = make_method("lora", settings);
    lora->attach(*model);
    {
      torch::NoGradGuard ng;
      for (auto& [name, t] : lora->trainable_parameters()) t.normal_(0.0, 0.02);
    }
    const auto path = dir / std::to_string(i);
    save_adapter(path, *model, {lora.get()});
    lora->detach(*model);
    set.load("a" + std::to_string(i), path);
  }
  std::filesystem::remove_all(dir);

  torch::NoGradGuard no_grad;
  const auto ids = torch::randint(c.vocab_size, {o.batch, o.seq}, torch::kLong);
  ForwardInput in{ids, {}, {}, {}};
  auto time = [&] { return median_seconds(o.repeat, [&] { model->forward(in, nullptr); }); };
  auto route_over = [&](int n) {
    std::vector<std::string> rows;
    for (std::int64_t r = 0; r < o.batch; ++r) rows.push_back("a" + std::to_string(r % n));
    set.route(rows);
    const double s = time();
    set.end_route();
    return s;
  };
  std::printf("threads %d, d %lld, %lld layers, seq %lld, batch %lld, LoRA r 8 on all-linear\n",
              torch::get_num_threads(), static_cast<long long>(o.d),
              static_cast<long long>(o.layers), static_cast<long long>(o.seq),
              static_cast<long long>(o.batch));
  set.set_active({});
  const double base = time();
  set.set_active({"a0"});
  const double one = time();
  std::printf("%-30s %9.1f ms  %5.3f\n", "no adapter", base * 1e3, base / one);
  std::printf("%-30s %9.1f ms  %5.3f\n", "one adapter, every row", one * 1e3, 1.0);
  for (const int n : {1, 4, 16}) {
    const double s = route_over(n);
    const std::string what = "routed over " + std::to_string(n) + " adapter" + (n > 1 ? "s" : "");
    std::printf("%-30s %9.1f ms  %5.3f\n", what.c_str(), s * 1e3, s / one);
  }
  std::printf("(last column: time over the time with one adapter on every row)\n");
  return 0;
}

}  // namespace graft::bench
