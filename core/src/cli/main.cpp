// graft: parameter-efficient fine-tuning for transformer models.
#include <c10/util/Exception.h>
#include <graft/load.h>
#include <graft/version.h>
#include <torch/version.h>

#include <cstring>
#include <iostream>

#include "cli/cli.h"

namespace {

constexpr const char* kUsage = R"(usage: graft <command> [options]

commands:
  run        train, evaluate and save as a YAML recipe says (key.path=value overrides)
  validate   check a recipe (keys, values, files, model, methods) without running it
  eval       evaluate a model, with adapters, on a recipe's eval data
  sweep      run a recipe over settings and seeds, in parallel, resumably (or on Slurm)
  report     tabulate and plot a sweep's results (CSV, Markdown, SVG)
  generate   continue a prompt with a model (greedy or sampled)
  inspect    show a model file's family, configuration, tensors and sites
  forward    run one forward pass and write logits and hidden states to safetensors
  methods    list the PEFT methods found in plugins, and plugins that failed to load
  merge      fold adapters into the base weights; write a Hugging Face folder or a GGUF file
  export-adapter  write an adapter in another format (peft, gguf, graft)
  new-plugin write a skeleton method plugin that builds against an installed graft
  version    print graft's and libtorch's versions

'graft <command> --help' shows a command's options.
)";

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
  if (args.empty() || args[0] == "--help" || args[0] == "-h" || args[0] == "help") {
    std::cout << kUsage;
    return args.empty() ? 2 : 0;
  }
  const std::string command = args[0];
  args.erase(args.begin());
  try {
    if (command == "run") return cli::run_run(args);
    if (command == "validate") return cli::run_validate(args);
    if (command == "eval") return cli::run_eval(args);
    if (command == "sweep") return cli::run_sweep(args);
    if (command == "report") return cli::run_report(args);
    if (command == "generate") return cli::run_generate(args);
    if (command == "inspect") return cli::run_inspect(args);
    if (command == "forward") return cli::run_forward(args);
    if (command == "methods") return cli::run_methods(args);
    if (command == "new-plugin") return cli::run_new_plugin(args);
    if (command == "merge") return cli::run_merge(args);
    if (command == "export-adapter") return cli::run_export_adapter(args);
    if (command == "version" || command == "--version") {
      std::cout << "graft " << GRAFT_VERSION << " (libtorch " << TORCH_VERSION << ")\n";
      return 0;
    }
    std::cerr << "graft: unknown command '" << command << "'\n\n" << kUsage;
    return 2;
  } catch (const cli::UsageError& e) {
    std::cerr << "graft " << command << ": " << e.what() << " (see 'graft " << command
              << " --help')\n";
    return 2;
  } catch (const Error& e) {
    std::cerr << "graft: error: " << e.what() << "\n";
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
