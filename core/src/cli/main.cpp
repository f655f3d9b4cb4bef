// graft: parameter-efficient fine-tuning for transformer models.
#include <c10/util/Exception.h>
#include <graft/load.h>
#include <graft/params.h>
#include <graft/version.h>
#include <torch/version.h>

#include <cstring>
#include <filesystem>
#include <iostream>
#include <new>
#include <sstream>

#include "cli/cli.h"
#include "util/file.h"

namespace {

using graft::cli::Args;

struct Command {
  const char* name;
  const char* summary;
  int (*run)(const Args&);
};

int run_version(const Args& args) {
  for (const auto& a : args) {
    if (a == "--help" || a == "-h") {
      std::cout << "usage: graft version\n\nprints graft's and libtorch's versions\n";
      return 0;
    }
    throw graft::cli::UsageError("unexpected argument '" + a + "'");
  }
  std::cout << "graft " << GRAFT_VERSION << " (libtorch " << TORCH_VERSION << ")\n";
  return 0;
}

const Command kCommands[] = {
    {"run", "train, evaluate and save as a YAML recipe says (key.path=value overrides)",
     graft::cli::run_run},
    {"validate", "check a recipe (keys, values, files, model, methods) without running it",
     graft::cli::run_validate},
    {"eval", "evaluate a model, with adapters, on a recipe's eval data", graft::cli::run_eval},
    {"sweep", "run a recipe over settings and seeds, in parallel, resumably (or on Slurm)",
     graft::cli::run_sweep},
    {"report", "tabulate and plot a sweep's results (CSV, Markdown, SVG)", graft::cli::run_report},
    {"ls", "list the shipped recipes and the building blocks they include", graft::cli::run_ls},
    {"cp", "copy a shipped recipe or building block to edit it", graft::cli::run_cp},
    {"generate", "continue a prompt with a model (greedy or sampled)", graft::cli::run_generate},
    {"classify", "label texts with a classifier: the model's own or an adapter's task head",
     graft::cli::run_classify},
    {"inspect", "show a model file's family, configuration, tensors and sites",
     graft::cli::run_inspect},
    {"forward", "run one forward pass and write logits and hidden states to safetensors",
     graft::cli::run_forward},
    {"methods", "list the PEFT methods found in plugins (NAME: one method's keys and defaults)",
     graft::cli::run_methods},
    {"merge", "fold adapters into the base weights; write a Hugging Face folder or a GGUF file",
     graft::cli::run_merge},
    {"export-adapter", "write an adapter in another format (peft, gguf, adapters, graft)",
     graft::cli::run_export_adapter},
    {"combine", "make one adapter from several with weights (linear, cat, svd, ties, dare...)",
     graft::cli::run_combine},
    {"new-plugin", "write a skeleton method plugin that builds against an installed graft",
     graft::cli::run_new_plugin},
    {"version", "print graft's and libtorch's versions", run_version},
};

std::string usage() {
  std::string s = "usage: graft [--verbose] <command> [options]\n\ncommands:\n";
  for (const auto& c : kCommands) {
    std::string name = c.name;
    s += "  " + name + std::string(name.size() < 15 ? 16 - name.size() : 1, ' ') + c.summary + "\n";
  }
  return s +
         "\n'graft <command> --help' shows a command's options; --threads N and --plugin-dir DIR\n"
         "may also come before the command.\n";
}

// Options every command takes may come before the command: moved behind it, where the command's
// own parser reads them.
Args reorder_global_options(Args args) {
  Args global;
  auto it = args.begin();
  while (it != args.end() && it->rfind("-", 0) == 0) {
    const bool takes_value = *it == "--threads" || *it == "--plugin-dir";
    const bool joined = it->rfind("--threads=", 0) == 0 || it->rfind("--plugin-dir=", 0) == 0;
    if (!takes_value && !joined) break;
    global.push_back(*it++);
    if (takes_value && it != args.end()) global.push_back(*it++);
  }
  if (global.empty() || it == args.end()) return args;
  Args out(it, args.end());
  out.insert(out.begin() + 1, global.begin(), global.end());
  return out;
}

// Several problems: one line each.
void print_lines(const std::string& what) {
  std::istringstream lines(what);
  for (std::string line; std::getline(lines, line);) std::cerr << "graft: error: " << line << "\n";
}

// "PATH: what failed: why", from the standard library's "filesystem error: what failed: why
// [PATH] [PATH2]".
std::string describe(const std::filesystem::filesystem_error& e) {
  std::string what = e.what();
  const std::string prefix = "filesystem error: ";
  if (what.rfind(prefix, 0) == 0) what.erase(0, prefix.size());
  const auto bracket = what.find(" [");
  if (bracket != std::string::npos) what.erase(bracket);
  return e.path1().empty() ? what : e.path1().string() + ": " + what;
}

}  // namespace

int main(int argc, char** argv) {
  using namespace graft;
  wait_passively(argv);
  std::vector<std::string> args(argv + 1, argv + argc);
  bool verbose = false;
  for (auto it = args.begin(); it != args.end();) {
    if (*it == "--verbose" || *it == "-v") {
      verbose = true;
      it = args.erase(it);
    } else {
      ++it;
    }
  }
  args = reorder_global_options(std::move(args));
  if (args.empty() || args[0] == "--help" || args[0] == "-h" || args[0] == "help") {
    std::cout << usage();
    return args.empty() ? 2 : 0;
  }
  std::string command = args[0];
  if (command == "--version") command = "version";
  args.erase(args.begin());
  const Command* found = nullptr;
  std::vector<std::string> names;
  for (const auto& c : kCommands) {
    names.push_back(c.name);
    if (command == c.name) found = &c;
  }
  if (!found) {
    const auto near = did_you_mean(command, names);
    std::cerr << "graft: unknown command '" << command << "'"
              << (near.empty() ? "" : " (did you mean '" + near + "'?)") << "\n\n"
              << usage();
    return 2;
  }
  // Exit status: 2 for an error in the input (a recipe, file, value or usage), 1 for a failure
  // of the machine or environment (a full disk, memory, a process that cannot start) and for
  // anything graft did not foresee.
  try {
    return found->run(args);
  } catch (const cli::UsageError& e) {
    std::cerr << "graft " << command << ": " << e.what() << " (see 'graft " << command
              << " --help')\n";
    return 2;
  } catch (const SystemError& e) {
    print_lines(e.what());
    return 1;
  } catch (const Error& e) {
    print_lines(e.what());
    return 2;
  } catch (const std::filesystem::filesystem_error& e) {
    std::cerr << "graft: error: " << describe(e) << "\n";
    return io::is_machine_failure(e.code()) ? 1 : 2;
  } catch (const std::bad_alloc&) {
    std::cerr << "graft: error: out of memory\n";
    return 1;
  } catch (const c10::Error& e) {
    std::string msg = verbose ? e.what() : e.what_without_backtrace();
    if (!verbose) msg = msg.substr(0, msg.find('\n'));
    std::cerr << "graft: error: " << msg << "\n";
    return 1;
  } catch (const std::exception& e) {
    std::cerr << "graft: error: " << e.what() << "\n";
    return 1;
  }
}
