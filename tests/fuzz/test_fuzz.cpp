// The fuzz corpus of the test suite: every target's seeds, then a fixed number of deterministic
// mutations of them (GRAFT_FUZZ_RUNS per target, 2000 unless set). An input that breaks the
// contract (harness.h) fails the case and is saved under fuzz-failures/ in the libFuzzer form,
// for `scripts/fuzz.sh TARGET FILE` to replay.
#include <doctest/doctest.h>
#include <graft/plugin.h>

#include <chrono>
#include <cstdlib>
#include <fstream>

#include "fuzz/harness.h"
#include "support.h"

namespace {

using namespace graft::fuzz;

std::uint64_t name_hash(const std::string& s) {  // FNV-1a: a per-target stream of mutations
  std::uint64_t h = 1469598103934665603ull;
  for (const unsigned char c : s) h = (h ^ c) * 1099511628211ull;
  return h;
}

void fuzz(const std::string& name) {
  graft::load_plugins();
  const auto& t = target(name);
  const auto& all = seeds(t);
  REQUIRE(!all.empty());
  graft::test::TempDir dir;
  for (const auto& seed : all) {  // the harness reads valid inputs: a refusal below means something
    const auto o = run_one(t, seed, seed.bytes, dir.path());
    CHECK_MESSAGE(o.accepted, seed.file << ": a valid seed was refused: " << o.error);
    CHECK_MESSAGE(o.problem.empty(), seed.file << ": " << o.problem);
  }
  const char* env = std::getenv("GRAFT_FUZZ_RUNS");
  const long runs = env ? std::strtol(env, nullptr, 10) : 2000;
  std::uint64_t state = name_hash(name);
  long refused = 0, accepted = 0, broken = 0;
  for (long i = 0; i < runs; ++i) {
    const auto k = static_cast<std::size_t>(i) % all.size();
    const auto bytes = mutate(all[k].bytes, state, is_text(all[k]));
    const auto start = std::chrono::steady_clock::now();
    const auto o = run_one(t, all[k], bytes, dir.path());
    const auto seconds =
        std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
    auto problem = o.problem;
    // A hostile input may cost work in proportion to its size, never minutes: these are tiny.
    if (problem.empty() && seconds > 20) problem = "took " + std::to_string(seconds) + " s";
    if (!problem.empty()) {
      std::filesystem::create_directories("fuzz-failures");
      const auto saved = "fuzz-failures/" + name + "-" + std::to_string(i) + ".bin";
      std::ofstream(saved, std::ios::binary) << encode_input(k, bytes);
      if (++broken <= 10)
        FAIL_CHECK(name << " input " << i << " (" << all[k].file << "): " << problem
                        << " [saved as " << saved << "; replay: scripts/fuzz.sh " << name << " "
                        << saved << "]");
    }
    (o.accepted ? accepted : refused) += 1;
  }
  MESSAGE(name << ": " << all.size() << " seeds, " << runs << " mutations: " << accepted
               << " accepted, " << refused << " refused, " << broken << " broke the contract");
  if (runs >= 50) CHECK(refused > 0);  // the mutations reach the readers' checks
}

}  // namespace

TEST_CASE("fuzz: safetensors") { fuzz("safetensors"); }
TEST_CASE("fuzz: gguf") { fuzz("gguf"); }
TEST_CASE("fuzz: hf-folder") { fuzz("hf-folder"); }
TEST_CASE("fuzz: tokenizer") { fuzz("tokenizer"); }
TEST_CASE("fuzz: peft-adapter") { fuzz("peft-adapter"); }
TEST_CASE("fuzz: graft-adapter") { fuzz("graft-adapter"); }
TEST_CASE("fuzz: gguf-adapter") { fuzz("gguf-adapter"); }
TEST_CASE("fuzz: recipe") { fuzz("recipe"); }
TEST_CASE("fuzz: sweep") { fuzz("sweep"); }

TEST_CASE("fuzz: every target has a test case here") {
  CHECK(targets().size() == 9);  // a new target needs its TEST_CASE above
}
