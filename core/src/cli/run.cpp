// graft run, graft validate, graft eval: recipes from the command line.
#include <graft/distributed.h>
#include <graft/error.h>
#include <graft/load.h>
#include <graft/plugin.h>
#include <graft/recipe.h>
#include <graft/train.h>
#include <signal.h>
#include <sys/prctl.h>
#include <sys/wait.h>
#include <torch/torch.h>
#include <unistd.h>

#include <cerrno>
#include <chrono>
#include <cstring>
#include <fstream>
#include <iostream>
#include <map>
#include <optional>
#include <sstream>
#include <thread>

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

// This process's command line as it was started (after main's re-exec), without --nproc.
std::vector<std::string> command_without_nproc() {
  std::ifstream in("/proc/self/cmdline", std::ios::binary);
  std::vector<std::string> argv;
  for (std::string a; std::getline(in, a, '\0');) argv.push_back(a);
  std::vector<std::string> out;
  for (std::size_t i = 0; i < argv.size(); ++i) {
    if (argv[i] == "--nproc") {
      ++i;
      continue;
    }
    if (argv[i].rfind("--nproc=", 0) == 0) continue;
    out.push_back(argv[i]);
  }
  return out;
}

std::vector<pid_t>* g_ranks = nullptr;
void forward_signal(int sig) {
  if (g_ranks)
    for (auto pid : *g_ranks) kill(pid, sig);
}

// graft run --nproc N: this command N times (without --nproc), as ranks 0..N-1 of one run on
// this machine, as torchrun --nproc-per-node starts them: RANK, WORLD_SIZE, LOCAL_RANK,
// LOCAL_WORLD_SIZE, MASTER_ADDR (127.0.0.1) and MASTER_PORT (a free one) in their environment,
// and cores / N threads each unless --threads says. Rank 0 speaks on this terminal; the others'
// output is kept, and shown for a rank that failed on its own. A rank that fails makes the others
// stop (they lose contact with it); they are killed if they have not after a grace period.
int launch_ranks(int n, bool threads_given) {
  auto argv = command_without_nproc();
  if (!threads_given)
    argv.insert(argv.end(), {"--threads", std::to_string(std::max(1, available_cores() / n))});
  const auto port = std::to_string(free_loopback_port());
  std::vector<char*> cargv;
  for (auto& a : argv) cargv.push_back(a.data());
  cargv.push_back(nullptr);
  std::vector<pid_t> pids;
  std::vector<int> fds;
  const pid_t parent = getpid();
  for (int k = 0; k < n; ++k) {
    int pipefd[2] = {-1, -1};
    if (k > 0 && pipe(pipefd) != 0)
      throw SystemError(std::string("cannot start rank processes: ") + std::strerror(errno));
    const pid_t pid = fork();
    if (pid < 0)
      throw SystemError(std::string("cannot start rank processes: ") + std::strerror(errno));
    if (pid == 0) {
      prctl(PR_SET_PDEATHSIG, SIGTERM);
      if (getppid() != parent) _exit(125);
      setenv("RANK", std::to_string(k).c_str(), 1);
      setenv("LOCAL_RANK", std::to_string(k).c_str(), 1);
      setenv("WORLD_SIZE", std::to_string(n).c_str(), 1);
      setenv("LOCAL_WORLD_SIZE", std::to_string(n).c_str(), 1);
      setenv("MASTER_ADDR", "127.0.0.1", 1);
      setenv("MASTER_PORT", port.c_str(), 1);
      setenv("GRAFT_LAUNCHER", "graft", 1);
      if (k > 0) {
        dup2(pipefd[1], 1);
        dup2(pipefd[1], 2);
        close(pipefd[0]);
        close(pipefd[1]);
      }
      execv("/proc/self/exe", cargv.data());
      const char msg[] = "graft: error: cannot execute the graft executable\n";
      [[maybe_unused]] auto w = write(2, msg, sizeof msg - 1);
      _exit(127);
    }
    pids.push_back(pid);
    if (k > 0) {
      close(pipefd[1]);
      fds.push_back(pipefd[0]);
    }
  }
  g_ranks = &pids;
  struct sigaction forward {};
  forward.sa_handler = forward_signal;
  sigaction(SIGTERM, &forward, nullptr);
  sigaction(SIGINT, &forward, nullptr);  // Ctrl-C reaches the ranks too: they stop together

  // The other ranks' output, read as it comes (a full pipe would stop them).
  std::vector<std::string> said(static_cast<std::size_t>(n));
  std::vector<std::thread> readers;
  for (int k = 1; k < n; ++k)
    readers.emplace_back([&, k] {
      char buf[4096];
      for (;;) {
        const auto got = ::read(fds[static_cast<std::size_t>(k - 1)], buf, sizeof buf);
        if (got > 0) {
          said[static_cast<std::size_t>(k)].append(buf, static_cast<std::size_t>(got));
        } else if (got == 0 || errno != EINTR) {
          break;
        }
      }
    });

  std::map<pid_t, int> rank_of;
  for (int k = 0; k < n; ++k) rank_of[pids[static_cast<std::size_t>(k)]] = k;
  std::vector<int> code(static_cast<std::size_t>(n), -1), killed_by(static_cast<std::size_t>(n), 0);
  std::optional<std::chrono::steady_clock::time_point> failed_at;
  int left = n;
  while (left > 0) {
    int status = 0;
    const pid_t pid = waitpid(-1, &status, WNOHANG);
    if (pid > 0 && rank_of.count(pid)) {
      const int k = rank_of[pid];
      code[static_cast<std::size_t>(k)] =
          WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
      if (WIFSIGNALED(status)) killed_by[static_cast<std::size_t>(k)] = WTERMSIG(status);
      --left;
      if (code[static_cast<std::size_t>(k)] != 0 && !failed_at)
        failed_at = std::chrono::steady_clock::now();
      continue;
    }
    if (pid < 0 && errno != EINTR) break;
    if (failed_at && std::chrono::steady_clock::now() - *failed_at > std::chrono::seconds(30)) {
      for (int k = 0; k < n; ++k)
        if (code[static_cast<std::size_t>(k)] < 0) kill(pids[static_cast<std::size_t>(k)], SIGKILL);
      failed_at = std::chrono::steady_clock::now() + std::chrono::hours(1);
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
  }
  for (auto& t : readers) t.join();
  for (int fd : fds) close(fd);
  g_ranks = nullptr;
  signal(SIGTERM, SIG_DFL);
  signal(SIGINT, SIG_DFL);

  // Rank 0 said what went wrong on this terminal. A rank that failed while rank 0 did not fail
  // for a reason of its own (rank 0 lost contact with it, or was stopped) says why.
  const int first = code[0];
  int result = first;
  for (int k = 1; k < n; ++k) {
    const int c = code[static_cast<std::size_t>(k)];
    if (c == 0) continue;
    if (result == 0) result = c;
    // Rank 0 refused the input (every rank did, in the same words), or all were interrupted.
    if (first == 2 || (c == first && !killed_by[static_cast<std::size_t>(k)])) continue;
    std::istringstream lines(said[static_cast<std::size_t>(k)]);
    std::string line, last;
    while (std::getline(lines, line))
      if (line.rfind("graft", 0) == 0) last = line;
    if (const int sig = killed_by[static_cast<std::size_t>(k)]; sig && last.empty())
      std::cerr << "graft: error: rank " << k << " was killed by signal " << sig << " ("
                << strsignal(sig) << ")\n";
    else if (!last.empty() && last.find("lost contact") == std::string::npos)
      std::cerr << "graft: rank " << k << ": " << last.substr(last.find(':') + 2) << "\n";
  }
  return result;
}

}  // namespace

int run_run(const Args& args) {
  po::options_description desc("options");
  desc.add_options()("resume", "continue the run in output.dir from its latest checkpoint")(
      "overwrite", "start again in an output.dir that holds a run (graft's files there go)")(
      "stop-at", po::value<std::int64_t>()->default_value(0),
      "stop after this step, leaving a checkpoint (as if interrupted)")(
      "nproc", po::value<int>()->default_value(1),
      "train on N processes of this machine, each with its share of every batch (as torchrun "
      "--nproc-per-node; docs/distributed.md)")(
      "rendezvous-timeout", po::value<double>()->default_value(300),
      "seconds the ranks of a distributed run wait for each other to join")(
      "recipe", po::value<std::vector<std::string>>(), "recipe file, then key=value overrides");
  po::positional_options_description pos;
  pos.add("recipe", -1);
  po::variables_map vm;
  if (!parse(args, desc, vm,
             "usage: graft run recipe.yaml [key.path=value ...] [--resume | --overwrite]", &pos))
    return 0;
  const int nproc = vm["nproc"].as<int>();
  const auto launch = launch_from_environment();
  if (nproc < 1 || nproc > available_cores() * 8)
    throw UsageError("--nproc: expected 1 to " + std::to_string(available_cores() * 8) +
                     " processes, got " + std::to_string(nproc));
  if (nproc > 1 && launch.distributed())
    throw UsageError("--nproc " + std::to_string(nproc) + " inside a process that " +
                     launch.launcher + " started as rank " + std::to_string(launch.rank) +
                     ": the launcher starts the processes; leave --nproc out");
  const double timeout = vm["rendezvous-timeout"].as<double>();
  if (!(timeout > 0)) throw UsageError("--rendezvous-timeout: expected seconds above 0");
  const auto recipe = read(vm);  // a bad recipe is refused once, before any rank starts
  if (nproc > 1) {
    require_distributed("--nproc " + std::to_string(nproc));
    return launch_ranks(nproc, !vm["threads"].defaulted());
  }
  // A rank of a distributed run computes with its share of the cores (Slurm binds each task to
  // its own CPUs already).
  int threads = vm["threads"].as<int>();
  if (launch.distributed() && vm["threads"].defaulted() && launch.launcher != "slurm")
    threads = std::max(1, available_cores() / launch.local_world_size);
  set_threads(threads);
  RunOptions o;
  o.launch = launch;
  o.rendezvous_timeout =
      std::chrono::milliseconds(static_cast<std::int64_t>(timeout * 1000.0 + 0.5));
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
