// The fuzz targets under libFuzzer (scripts/fuzz.sh). GRAFT_FUZZ_TARGET names the target;
// GRAFT_FUZZ_SEEDS, when set, is a folder the target's seeds are written into (the corpus to
// start from). An input that breaks the contract aborts, so that libFuzzer keeps it.
#include <graft/plugin.h>
#include <unistd.h>

#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <iostream>

#include "fuzz/harness.h"

namespace {

const graft::fuzz::Target* chosen = nullptr;
std::filesystem::path work;

}  // namespace

extern "C" int LLVMFuzzerInitialize(int*, char***) {
  const char* name = std::getenv("GRAFT_FUZZ_TARGET");
  try {
    chosen = &graft::fuzz::target(name ? name : "");
  } catch (const std::exception& e) {
    std::cerr << "graft_libfuzzer: set GRAFT_FUZZ_TARGET: " << e.what() << "\n";
    std::exit(2);
  }
  graft::load_plugins();
  const auto& seeds = graft::fuzz::seeds(*chosen);
  if (const char* dir = std::getenv("GRAFT_FUZZ_SEEDS")) {
    std::filesystem::create_directories(dir);
    for (std::size_t i = 0; i < seeds.size(); ++i)
      std::ofstream(std::filesystem::path(dir) / ("seed-" + std::to_string(i)), std::ios::binary)
          << graft::fuzz::encode_input(i, seeds[i].bytes);
  }
  work = std::filesystem::temp_directory_path() / ("graft-libfuzzer-" + std::to_string(::getpid()));
  std::filesystem::create_directories(work);
  return 0;
}

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  const auto [k, bytes] = graft::fuzz::decode_input(*chosen, data, size);
  const auto outcome = graft::fuzz::run_one(*chosen, graft::fuzz::seeds(*chosen)[k], bytes, work);
  if (!outcome.problem.empty()) {
    std::cerr << "graft_libfuzzer: " << chosen->name << ": " << outcome.problem << "\n";
    std::abort();
  }
  return 0;
}
