// graft run, graft validate, graft eval: recipes from the command line.
#include <graft/load.h>
#include <graft/plugin.h>
#include <graft/recipe.h>
#include <graft/train.h>
#include <torch/torch.h>

#include <iostream>

#include "cli/options.h"

namespace graft::cli {
namespace {

// The recipe file and the key=value overrides that follow it.
struct RecipeArgs {
  std::string file;
  std::vector<std::string> overrides;
};

RecipeArgs recipe_args(const po::variables_map& vm) {
  if (!vm.count("recipe"))
    throw UsageError("give a recipe file: graft <command> recipe.yaml [key=value ...]");
  auto all = vm["recipe"].as<std::vector<std::string>>();
  RecipeArgs r{all.front(), {all.begin() + 1, all.end()}};
  for (const auto& o : r.overrides)
    if (o.find('=') == std::string::npos)
      throw UsageError("\"" + o + "\" is not an override; write key.path=value (train.lr=3e-4)");
  return r;
}

Recipe read(const po::variables_map& vm) {
  load_cli_plugins(vm);
  const auto a = recipe_args(vm);
  auto params = load_recipe(a.file, a.overrides);
  return Recipe::from_params(params, a.file);
}

// "graft run recipe.yaml ...", as typed (without global options that came first).
std::string command_line(const std::string& command, const Args& args) {
  std::string s = "graft " + command;
  for (const auto& a : args) s += " " + a;
  return s;
}

}  // namespace

int run_run(const Args& args) {
  po::options_description desc("options");
  desc.add_options()("resume", "continue the run in output.dir from its latest checkpoint")(
      "overwrite", "start again in an output.dir that holds a run (graft's files there go)")(
      "stop-at", po::value<std::int64_t>()->default_value(0),
      "stop after this step, leaving a checkpoint (as if interrupted)")(
      "recipe", po::value<std::vector<std::string>>(), "recipe file, then key=value overrides");
  po::positional_options_description pos;
  pos.add("recipe", -1);
  po::variables_map vm;
  if (!parse(args, desc, vm,
             "usage: graft run recipe.yaml [key.path=value ...] [--resume | --overwrite]", &pos))
    return 0;
  set_threads(vm["threads"].as<int>());
  const auto recipe = read(vm);
  RunOptions o;
  o.resume = vm.count("resume") > 0;
  o.overwrite = vm.count("overwrite") > 0;
  o.stop_at = vm["stop-at"].as<std::int64_t>();
  if (o.stop_at < 0) throw UsageError("--stop-at: expected a step number (0: do not stop)");
  o.command_line = command_line("run", args);
  o.handle_signals = true;  // Ctrl-C: a checkpoint at the next step, then exit (128 + signal)
  const auto summary = run_recipe(recipe, o);
  if (summary.contains("interrupted_at")) return 128 + summary["signal"].get<int>();
  return 0;
}

int run_validate(const Args& args) {
  po::options_description desc("options");
  desc.add_options()("recipe", po::value<std::vector<std::string>>(),
                     "recipe file, then key=value overrides");
  po::positional_options_description pos;
  pos.add("recipe", -1);
  po::variables_map vm;
  if (!parse(args, desc, vm, "usage: graft validate recipe.yaml [key.path=value ...]", &pos))
    return 0;
  const auto recipe = read(vm);
  // As the run would start: the model, the methods attached in order (sites, widths,
  // conflicting claims), lengths, and the data read and tokenized. Nothing is trained or written.
  const auto counts = validate_recipe(recipe);
  std::cout << recipe.file.string() << ": valid (" << recipe.methods.items().size() << " method"
            << (recipe.methods.items().size() == 1 ? "" : "s") << ", " << recipe.task.train.size()
            << " training file" << (recipe.task.train.size() == 1 ? "" : "s") << ", "
            << counts["train_examples"].get<std::size_t>() << " training examples, output "
            << recipe.output.dir.string() << ")\n";
  // The recipe is valid; the folder it writes to may still hold a run, which `graft run` would
  // not overwrite without being told.
  const auto& out = recipe.output.dir;
  if (std::filesystem::exists(out / "summary.json") || !latest_checkpoint(out).empty())
    std::cout << "note: " << out.string() << " already holds a "
              << (std::filesystem::exists(out / "summary.json") ? "finished run"
                                                                : "run with checkpoints")
              << "; graft run needs --resume, --overwrite or another output.dir\n";
  return 0;
}

int run_eval(const Args& args) {
  po::options_description desc("options");
  desc.add_options()("adapter", po::value<std::vector<std::string>>(),
                     "[NAME=]PATH: an adapter to load (repeatable; none: the base model)")(
      "recipe", po::value<std::vector<std::string>>(), "recipe file, then key=value overrides");
  po::positional_options_description pos;
  pos.add("recipe", -1);
  po::variables_map vm;
  if (!parse(args, desc, vm,
             "usage: graft eval recipe.yaml [key.path=value ...] [--adapter DIR]\n"
             "Evaluates the recipe's model (with the adapters) on the recipe's eval data.",
             &pos))
    return 0;
  set_threads(vm["threads"].as<int>());
  const auto recipe = read(vm);
  std::vector<std::string> adapters;
  for (const auto& a : adapter_args(vm)) adapters.push_back(a.path);  // NAME=PATH too
  std::cout << evaluate_recipe(recipe, adapters).dump(2) << "\n";     // numbers and names only
  return 0;
}

}  // namespace graft::cli
