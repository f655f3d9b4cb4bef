#define DOCTEST_CONFIG_IMPLEMENT
#include <doctest/doctest.h>
#include <torch/torch.h>

int main(int argc, char** argv) {
  torch::set_num_threads(1);  // ctest runs the cases in parallel; keep each on one core
  doctest::Context context(argc, argv);
  return context.run();
}
