// Option parsing shared by the commands (Boost.Program_options, kept out of public headers).
#pragma once

#include <graft/adapter_set.h>
#include <graft/load.h>
#include <graft/method.h>

#include <boost/program_options.hpp>
#include <iostream>
#include <memory>
#include <vector>

#include "cli/cli.h"

namespace graft::cli {

namespace po = boost::program_options;

/// Parses `args` against `desc` (and positional names); prints help and returns false for
/// --help; throws UsageError for anything malformed.
inline bool parse(const Args& args, po::options_description& desc, po::variables_map& vm,
                  const char* usage, const po::positional_options_description* pos = nullptr) {
  desc.add_options()("help,h", "show this help")(
      "threads", po::value<int>()->default_value(0, "all cores"),
      "threads that compute, from 1 to the machine's cores")(
      "plugin-dir", po::value<std::vector<std::string>>(), "another folder to load plugins from");
  try {
    auto parser = po::command_line_parser(args).options(desc);
    if (pos) parser.positional(*pos);
    po::store(parser.run(), vm);
    if (vm.count("help")) {
      std::cout << usage << "\n\n" << desc << "\n";
      return false;
    }
    po::notify(vm);
  } catch (const po::error& e) {
    throw UsageError(e.what());
  }
  if (!vm["threads"].defaulted()) {
    const int threads = vm["threads"].as<int>(), cores = available_cores();
    if (threads < 1 || threads > cores)
      throw UsageError("--threads: expected 1 to " + std::to_string(cores) +
                       " (this machine's cores), got " + std::to_string(threads));
  }
  return true;
}

/// Loads the plugins on the search path plus --plugin-dir folders.
void load_cli_plugins(const po::variables_map& vm);

/// Declares --adapter (repeatable), read by apply_adapters() and load_adapter_set().
inline void add_adapter_option(po::options_description& desc) {
  desc.add_options()("adapter", po::value<std::vector<std::string>>(),
                     "[NAME=]PATH: an adapter to load onto the model (repeatable): a graft, peft "
                     "or AdapterHub folder, or a llama.cpp adapter .gguf file; NAME (default: the "
                     "folder's name) is what --active and --route call it")(
      "adapter-scale", po::value<std::vector<double>>(),
      "multiply an adapter's update (one value for all adapters, or one per --adapter in order)");
}

/// Declares --active and --route, read by load_adapter_set().
inline void add_routing_options(po::options_description& desc) {
  desc.add_options()("active", po::value<std::string>(),
                     "NAME,NAME,...: the adapters that apply (default: every --adapter; none: "
                     "the base model)")(
      "route", po::value<std::string>(),
      "NAME,NAME,...: one adapter per row of the batch (base: none), all in one forward");
}

/// One --adapter value: the name it goes by and its path.
struct AdapterArg {
  std::string name, path;
};
/// The --adapter values: "NAME=PATH", or a path named after its file (without a .gguf suffix).
/// Names may repeat here; load_adapter_set() refuses two of one name.
std::vector<AdapterArg> adapter_args(const po::variables_map& vm);

/// Loads the adapters named by --adapter (if any) onto the model, all of them applying.
std::vector<std::unique_ptr<Method>> apply_adapters(const po::variables_map& vm, Model& model);

/// Loads the --adapter values (if any) onto the model under their names, and applies --active
/// and --route (whose names must number `rows`, the batch's rows).
std::unique_ptr<AdapterSet> load_adapter_set(const po::variables_map& vm, Model& model,
                                             std::int64_t rows);
/// The names of a comma-separated --route value.
std::vector<std::string> route_names(const po::variables_map& vm);

}  // namespace graft::cli
