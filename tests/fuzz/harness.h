// Fuzz harnesses for every parser graft runs on a stranger's file: safetensors, GGUF, a Hugging
// Face folder's config.json and weights, tokenizer.json, adapters (peft's format and graft's) and
// recipe and sweep YAML. Each target knows valid seed inputs, and reads one input as graft does,
// then uses what it read (a forward pass, an encoding). The contract for any input: it is
// accepted, or refused by one graft::Error line that names the file and speaks no library jargon;
// nothing crashes, nothing is written.
//
// Two drivers run the same targets: a seeded, deterministic mutation corpus in the test suite
// (test_fuzz.cpp, one ctest per target) and libFuzzer for long runs (libfuzzer.cpp,
// scripts/fuzz.sh). An input is one byte choosing the seed (which file is mutated, and the files
// around it) followed by the mutated file's bytes.
#pragma once

#include <cstdint>
#include <filesystem>
#include <map>
#include <string>
#include <vector>

namespace graft::fuzz {

/// A valid input: the file being fuzzed, and the unchanged files it needs beside it.
struct Seed {
  std::string file;                               ///< path relative to the work folder
  std::string bytes;                              ///< its valid contents
  std::map<std::string, std::string> companions;  ///< other files, relative path -> contents
};

struct Target {
  std::string name;
  std::string summary;
  /// Reads the input at `dir / file` as graft does (with its companions beside it) and uses it.
  void (*parse)(const std::filesystem::path& dir, const std::string& file);
  std::vector<Seed> (*make_seeds)();
};

/// Every target, in a fixed order.
const std::vector<Target>& targets();
/// The target called `name`; throws std::invalid_argument listing the names otherwise.
const Target& target(const std::string& name);
/// The target's seeds, made once (they are written by graft's own writers from tiny models).
const std::vector<Seed>& seeds(const Target& target);

/// What one input did.
struct Outcome {
  bool accepted = false;
  std::string error;    ///< the graft::Error message when refused
  std::string problem;  ///< non-empty: the contract was broken (and how)
};

/// Writes the seed's companions and `bytes` as its file into the empty folder `dir`, runs the
/// target, checks the contract and empties `dir` again.
Outcome run_one(const Target& target, const Seed& seed, const std::string& bytes,
                const std::filesystem::path& dir);

/// A deterministic mutation of `bytes` from the generator state `state` (splitmix64): byte-level
/// edits (bit flips, boundary integers, truncation, deletion, duplication, insertion) and, for
/// text (`text`), token-level ones (numbers replaced by boundary values, strings emptied or
/// lengthened, lines deleted or repeated).
std::string mutate(const std::string& bytes, std::uint64_t& state, bool text);

/// Whether the seed's file is text (JSON, YAML) rather than binary.
bool is_text(const Seed& seed);

/// The libFuzzer form of an input: the seed's index, then the file's bytes.
std::string encode_input(std::size_t seed_index, const std::string& bytes);
/// Splits a libFuzzer input into the seed it names (index modulo the seed count) and the bytes.
std::pair<std::size_t, std::string> decode_input(const Target& target, const std::uint8_t* data,
                                                 std::size_t size);

}  // namespace graft::fuzz
