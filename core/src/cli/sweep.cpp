// graft sweep and graft report: many recipes over seeds and settings, and their tables.
#include <graft/distributed.h>
#include <graft/io/file.h>
#include <graft/plugin.h>
#include <graft/sweep.h>
#include <sys/stat.h>
#include <unistd.h>

#include <array>
#include <cstdio>
#include <iostream>
#include <sstream>

#include "cli/options.h"

namespace graft::cli {
namespace fs = std::filesystem;

namespace {

fs::path this_executable() { return fs::canonical("/proc/self/exe"); }

// A program on PATH, or an empty path.
fs::path on_path(const std::string& name) {
  const char* path = std::getenv("PATH");
  std::istringstream dirs(path ? path : "");
  for (std::string dir; std::getline(dirs, dir, ':');)
    if (!dir.empty() && access((fs::path(dir) / name).c_str(), X_OK) == 0)
      return fs::path(dir) / name;
  return {};
}

std::vector<std::string> plugin_dirs(const po::variables_map& vm) {
  std::vector<std::string> dirs;
  if (vm.count("plugin-dir"))
    for (const auto& d : vm["plugin-dir"].as<std::vector<std::string>>())
      dirs.push_back(fs::absolute(d).string());
  return dirs;
}

// Runs `sbatch script` and returns what it printed ("Submitted batch job N").
std::string submit(const fs::path& script) {
  const std::string command = "sbatch '" + script.string() + "' 2>&1";
  FILE* pipe = popen(command.c_str(), "r");
  if (!pipe) throw SystemError("cannot run sbatch");
  std::string out;
  std::array<char, 256> buf{};
  while (fgets(buf.data(), buf.size(), pipe)) out += buf.data();
  const int rc = pclose(pipe);
  if (rc != 0)
    throw SystemError(
        "sbatch " + script.string() + " failed" +
        (out.find("not found") != std::string::npos
             ? std::string(": sbatch is not on the PATH (is this a Slurm login node?)")
             : ": " + out.substr(0, out.find('\n'))) +
        "; the script is written, submit it by hand with: sbatch " + script.string());
  return out;
}

}  // namespace

int run_sweep(const Args& args) {
  po::options_description desc("options");
  desc.add_options()("workers", po::value<int>(),
                     "trials run at once (default: the sweep's workers)")(
      "output", po::value<std::string>(), "the sweep folder (default: the sweep's output)")(
      "trial", po::value<std::size_t>(), "run only the trial with this index (a Slurm array task)")(
      "max-trials", po::value<std::int64_t>()->default_value(0),
      "stop starting trials after this many (0 = all)")("retry-failed", "run failed trials again")(
      "store", po::value<std::string>(), "the trial store (default: <output>/sweep.db)")(
      "list", "list the trials and exit")("launcher",
                                          po::value<std::string>()->default_value("local"),
                                          "local: run here; slurm: write a Slurm job array script")(
      "submit", "with --launcher slurm: submit the script with sbatch")(
      "srun",
      "start each trial's processes (trial_nproc) with srun, one per task (the job "
      "array script says it)")(
      "sbatch", po::value<std::vector<std::string>>(),
      "with --launcher slurm: an extra #SBATCH option, e.g. --sbatch=--partition=cpu (repeatable)")(
      "time", po::value<std::string>()->default_value(""),
      "with --launcher slurm: time limit per trial, e.g. 01:00:00")(
      "sweep", po::value<std::string>(), "the sweep file");
  po::positional_options_description pos;
  pos.add("sweep", 1);
  po::variables_map vm;
  if (!parse(args, desc, vm,
             "usage: graft sweep sweep.yaml [--workers N] [--output DIR]\n"
             "       graft sweep sweep.yaml --launcher slurm [--submit] [--sbatch OPT]...\n"
             "Runs every trial of a sweep (settings x seeds), each a 'graft run' in its own run\n"
             "folder, resuming an interrupted sweep, then writes the report (graft report).",
             &pos))
    return 0;
  if (!vm.count("sweep")) throw UsageError("give a sweep file: graft sweep sweep.yaml");
  const auto launcher = vm["launcher"].as<std::string>();
  if (launcher != "local" && launcher != "slurm")
    throw UsageError("--launcher " + launcher + ": expected local or slurm");
  if (vm.count("submit") && launcher != "slurm")
    throw UsageError("--submit goes with --launcher slurm");
  if (vm.count("workers") && vm["workers"].as<int>() < 1)
    throw UsageError("--workers: expected a positive number of processes");
  load_cli_plugins(vm);
  auto sweep = load_sweep(vm["sweep"].as<std::string>(),
                          vm.count("output") ? vm["output"].as<std::string>() : "");
  if (vm["threads"].as<int>() > 0) sweep.trial_threads = vm["threads"].as<int>();
  if (vm.count("workers")) sweep.workers = vm["workers"].as<int>();
  validate_sweep(sweep);
  const fs::path store = vm.count("store") ? fs::path(vm["store"].as<std::string>()) : fs::path();

  if (vm.count("list")) {
    for (const auto& t : sweep.trials) {
      std::cout << t.index << "  " << t.id << "  seed " << t.seed << "\n";
      for (const auto& o : t.overrides) std::cout << "      " << o << "\n";
    }
    return 0;
  }
  if (launcher == "slurm") {
    SlurmOptions so;
    so.graft = this_executable();
    so.concurrent = vm.count("workers") ? sweep.workers : 0;
    so.time = vm["time"].as<std::string>();
    if (vm.count("sbatch")) so.sbatch_options = vm["sbatch"].as<std::vector<std::string>>();
    so.plugin_dirs = plugin_dirs(vm);
    so.store = store;
    const auto script = slurm_script(sweep, so);
    fs::create_directories(sweep.dir / "slurm");
    io::write_atomically(sweep.dir / "sweep.json",
                         [&](std::ostream& out) { out << sweep.to_json().dump(2) << "\n"; });
    TrialStore(store.empty() ? sweep.dir / "sweep.db" : store).sync(sweep);
    const auto file = sweep.dir / "slurm" / "sweep.sbatch";
    io::write_atomically(file, [&](std::ostream& out) { out << script; });
    chmod(file.c_str(), 0755);
    std::cout << "wrote " << file.string() << " (" << sweep.trials.size()
              << " array tasks, one trial each)\n";
    if (vm.count("submit"))
      std::cout << submit(file);
    else
      std::cout << "submit it with: sbatch " << file.string() << "\n";
    return 0;
  }

  if (sweep.trial_threads > available_cores())
    throw Error(sweep.file.string() + ": trial_threads: " + std::to_string(sweep.trial_threads) +
                " is more than this machine's " + std::to_string(available_cores()) +
                " cores (--launcher slurm takes any number)");
  if (sweep.trial_nproc > 1 && !vm.count("srun"))
    require_distributed(sweep.file.string() +
                        ": trial_nproc: " + std::to_string(sweep.trial_nproc));
  SweepOptions o;
  o.workers = sweep.workers;
  o.graft = this_executable();
  o.store = store;
  o.plugin_dirs = plugin_dirs(vm);
  if (vm.count("trial")) o.only = vm["trial"].as<std::size_t>();
  if (vm.count("srun")) {
    o.srun = on_path("srun");
    if (o.srun.empty())
      throw Error("--srun: no srun on PATH (run the job array script under Slurm)");
  }
  o.max_trials = vm["max-trials"].as<std::int64_t>();
  o.retry_failed = vm.count("retry-failed") > 0;
  o.log = &std::cerr;
  std::cerr << "graft sweep " << sweep.file.string() << ": " << sweep.trials.size() << " trials, "
            << sweep.workers << " at a time, " << sweep.trial_threads << " thread"
            << (sweep.trial_threads == 1 ? "" : "s") << " each; folder " << sweep.dir.string()
            << "\n";
  const auto outcome = graft::run_sweep(sweep, o);
  if (o.only) return outcome.failed ? 1 : 0;
  std::cout << report_sweep(sweep.dir);
  std::cout << "report: " << (sweep.dir / "report" / "results.md").string() << "\n";
  std::size_t failed = 0;
  for (const auto& row : TrialStore(store.empty() ? sweep.dir / "sweep.db" : store).rows())
    failed += row.status == "failed";
  if (failed) {
    std::cerr << "graft sweep: " << failed << " trial" << (failed == 1 ? "" : "s")
              << " failed (logs in " << (sweep.dir / "logs").string() << "); 'graft sweep "
              << sweep.file.string() << " --retry-failed' runs them again\n";
    return 1;
  }
  return 0;
}

int run_report(const Args& args) {
  po::options_description desc("options");
  desc.add_options()("dir", po::value<std::string>(), "the sweep folder");
  po::positional_options_description pos;
  pos.add("dir", 1);
  po::variables_map vm;
  if (!parse(args, desc, vm,
             "usage: graft report DIR\n"
             "Writes DIR/report/: results.csv and results.md (mean, std and count over seeds per\n"
             "setting), trials.csv and plots/*.svg, from the trials' run folders.",
             &pos))
    return 0;
  if (!vm.count("dir")) throw UsageError("give a sweep folder: graft report runs/sweeps/NAME");
  const fs::path dir = vm["dir"].as<std::string>();
  std::cout << report_sweep(dir);
  std::cout << "report: " << (dir / "report" / "results.md").string() << "\n";
  return 0;
}

}  // namespace graft::cli
