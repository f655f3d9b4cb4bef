// graft_bench --routing: per-row routing over several LoRA adapters against one adapter.
#pragma once

#include <cstdint>

namespace graft::bench {

struct RoutingBenchOptions {
  std::int64_t d = 512, layers = 8, heads = 8, ffn = 1376, vocab = 32000, seq = 128, batch = 16;
  int repeat = 5;
};

/// Runs the benchmark and prints its report; returns the exit status.
int routing_bench(const RoutingBenchOptions& options);

}  // namespace graft::bench
