// graft_bench --train: the training step's throughput, FLOPs, memory and breakdown.
#pragma once

#include <cstdint>
#include <string>

namespace graft::bench {

struct TrainBenchOptions {
  std::string methods;  ///< a preset name or a YAML list of methods
  std::int64_t d = 512, layers = 8, heads = 8, ffn = 1376, vocab = 32000, seq = 256, batch = 8;
  int repeat = 3;
  bool bf16 = false;  ///< the forward and loss under bfloat16 autocast (train.precision: bf16)
};

/// Runs the benchmark and prints its report; returns the exit status.
int train_bench(const TrainBenchOptions& options);

}  // namespace graft::bench
