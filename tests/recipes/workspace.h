// A work folder for recipe and sweep tests: a tiny llama saved as a Hugging Face folder with a
// byte-level tokenizer, a text corpus, labelled data and a base recipe (lm.yaml).
#pragma once

#include <graft/io/file.h>
#include <graft/load.h>
#include <graft/plugin.h>
#include <graft/recipe.h>
#include <graft/train.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cstdlib>
#include <fstream>
#include <map>
#include <nlohmann/json.hpp>

#include "support.h"
#include "test_config.h"
#include "tiny_models.h"

namespace graft::test {

namespace fs = std::filesystem;
using nlohmann::json;

inline void write(const fs::path& path, const std::string& text) {
  fs::create_directories(path.parent_path());
  std::ofstream(path) << text;
}

inline std::string read(const fs::path& path) { return io::read_text_file(path); }

// A tiny llama (vocabulary: 256 bytes + end of text) as a Hugging Face folder with its
// byte-level tokenizer.json.
inline fs::path tiny_model_folder(const fs::path& dir) {
  auto config = graft::test::tiny_config("llama");
  config.vocab_size = 257;
  config.architecture = "LlamaForCausalLM";
  config.eos_token_id = 256;
  auto model = make_model(config);
  init_random(*model, 3, 0.1);
  save_hf_model(*model, dir);
  json vocab = json::object();
  for (int b = 0; b < 256; ++b) {
    // GPT-2's byte-to-character map: printable bytes stand for themselves, others shift to 256+.
    std::string ch;
    int cp = b;
    if (!((b >= 33 && b <= 126) || (b >= 161 && b <= 172) || (b >= 174 && b <= 255))) {
      static int next = 0;
      static std::map<int, int> shifted;
      if (!shifted.count(b)) shifted[b] = 256 + next++;
      cp = shifted[b];
    }
    if (cp < 0x80) {
      ch = std::string(1, static_cast<char>(cp));
    } else {
      ch += static_cast<char>(0xC0 | (cp >> 6));
      ch += static_cast<char>(0x80 | (cp & 0x3F));
    }
    vocab[ch] = b;
  }
  json tok = {
      {"model", {{"type", "BPE"}, {"vocab", vocab}, {"merges", json::array()}}},
      {"added_tokens", {{{"id", 256}, {"content", "<|endoftext|>"}, {"special", true}}}},
      {"normalizer", nullptr},
      {"pre_tokenizer", {{"type", "ByteLevel"}, {"add_prefix_space", false}, {"use_regex", true}}},
      {"post_processor", {{"type", "ByteLevel"}}},
      {"decoder", {{"type", "ByteLevel"}}}};
  write(dir / "tokenizer.json", tok.dump());
  return dir;
}

// A work folder with the tiny model, a text corpus, labelled data and a base recipe.
struct Workspace {
  TempDir tmp;
  fs::path dir = tmp.path();
  Workspace() {
    load_plugins();
    tiny_model_folder(dir / "model");
    std::string corpus;
    for (int i = 0; i < 40; ++i)
      corpus += "the cat sat on the mat. the dog sat on the log. " + std::to_string(i % 7) + "\n";
    write(dir / "data/train.txt", corpus);
    write(dir / "data/eval.txt", corpus.substr(0, 600));
    std::string labelled = "[";
    for (int i = 0; i < 48; ++i)
      labelled += std::string(i ? "," : "") + R"({"text": ")" + (i % 2 ? "good fun" : "bad, dull") +
                  " " + std::to_string(i) + R"(", "class": )" + std::to_string(i % 2) + "}";
    write(dir / "data/labelled.json", labelled + "]");
    write(dir / "lm.yaml", R"(seed: 7
model:
  path: model
task:
  kind: causal_lm
  train: data/train.txt
  eval: data/eval.txt
  max_length: 32
methods:
  - name: lora
    r: 4
    dropout: 0.1
    targets: [all-linear]
train:
  steps: 6
  batch_size: 4
  lr: 1.0e-2
  schedule: cosine
  warmup_steps: 2
  log_every: 1
eval:
  every: 3
  batches: 2
generate:
  prompt: "the cat"
  max_new_tokens: 8
output:
  dir: runs/lm
)");
  }
  Recipe recipe(const std::string& file, const std::vector<std::string>& overrides = {}) const {
    return Recipe::from_params(load_recipe(dir / file, overrides), dir / file);
  }
  RunOptions quiet() const {
    RunOptions o;
    o.progress = false;
    return o;
  }
};

inline std::string shell_quote(const std::string& s) {
  std::string out = "'";
  for (char c : s) out += c == '\'' ? std::string("'\\''") : std::string(1, c);
  return out + "'";
}

// Runs the graft executable with `args` in the current folder; returns its exit code and
// writes its output to `log`.
inline int graft_cli(const std::string& args, const fs::path& log) {
  const auto command =
      shell_quote(GRAFT_EXECUTABLE) + " " + args + " >" + shell_quote(log.string()) + " 2>&1";
  const int rc = std::system(command.c_str());
  return WIFEXITED(rc) ? WEXITSTATUS(rc) : -1;
}

// Starts the graft executable in the background, with `env` (NAME=VALUE) added to its
// environment.
inline pid_t start_graft(const std::vector<std::string>& args, const fs::path& log,
                         const std::vector<std::string>& env = {}) {
  std::string command = env.empty() ? "exec " : "exec env ";
  for (const auto& e : env) command += shell_quote(e) + " ";
  command += shell_quote(GRAFT_EXECUTABLE);
  for (const auto& a : args) command += " " + shell_quote(a);
  command += " >" + shell_quote(log.string()) + " 2>&1";
  const pid_t pid = fork();
  if (pid == 0) {
    execl("/bin/sh", "sh", "-c", command.c_str(), static_cast<char*>(nullptr));
    _exit(127);
  }
  return pid;
}

inline int wait_for(pid_t pid) {
  int status = 0;
  waitpid(pid, &status, 0);
  return WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
}

// Relative output folders are relative to the working directory: run inside the workspace.
struct InDir {
  fs::path old = fs::current_path();
  explicit InDir(const fs::path& d) { fs::current_path(d); }
  ~InDir() { fs::current_path(old); }
};

}  // namespace graft::test
