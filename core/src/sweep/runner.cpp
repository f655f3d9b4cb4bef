// Running a sweep's trials: each one a `graft run` child process in its own run folder.
#include <fcntl.h>
#include <graft/io/file.h>
#include <graft/sweep.h>
#include <graft/train.h>
#include <sys/prctl.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cerrno>
#include <chrono>
#include <csignal>
#include <cstring>
#include <ctime>
#include <fstream>
#include <map>
#include <ostream>

#include "sweep/internal.h"

namespace graft {
namespace fs = std::filesystem;
using nlohmann::json;
using Clock = std::chrono::steady_clock;

namespace {

// The last line of a trial's log that says what went wrong.
std::string error_line(const fs::path& log) {
  std::ifstream in(log);
  std::string line, last, error;
  while (std::getline(in, line)) {
    if (line.empty()) continue;
    last = line;
    if (line.find("error") != std::string::npos) error = line;
  }
  return error.empty() ? last : error;
}

std::string timestamp() {
  const auto t = std::time(nullptr);
  char buf[32];
  std::strftime(buf, sizeof buf, "%Y-%m-%d %H:%M:%S", std::gmtime(&t));
  return buf;
}

// Starts `argv` with its output appended to `log`. The child dies with the sweep process
// (PR_SET_PDEATHSIG), so a killed sweep leaves no trial writing to its folder behind it.
pid_t spawn(const std::vector<std::string>& argv, const fs::path& log) {
  std::vector<char*> args;
  for (const auto& a : argv) args.push_back(const_cast<char*>(a.c_str()));
  args.push_back(nullptr);
  const auto log_path = log.string();
  const pid_t parent = getpid();
  const pid_t pid = fork();
  if (pid < 0)
    throw SystemError(std::string("cannot start a trial process: ") + std::strerror(errno));
  if (pid == 0) {
    prctl(PR_SET_PDEATHSIG, SIGTERM);
    if (getppid() != parent) _exit(125);
    const int fd = open(log_path.c_str(), O_WRONLY | O_CREAT | O_APPEND, 0644);
    const int null = open("/dev/null", O_RDONLY);
    if (fd < 0 || null < 0) _exit(126);
    dup2(null, 0);
    dup2(fd, 1);
    dup2(fd, 2);
    execv(args[0], args.data());
    const char msg[] = "graft: error: cannot execute the graft executable\n";
    [[maybe_unused]] auto n = write(2, msg, sizeof msg - 1);
    _exit(127);
  }
  return pid;
}

}  // namespace

SweepOutcome run_sweep(const Sweep& sweep, const SweepOptions& o) {
  fs::create_directories(sweep.dir / "trials");
  fs::create_directories(sweep.dir / "logs");
  io::write_atomically(sweep.dir / "sweep.json",
                       [&](std::ostream& out) { out << sweep.to_json().dump(2) << "\n"; });
  TrialStore store(o.store.empty() ? sweep.dir / "sweep.db" : o.store);
  store.sync(sweep);

  std::map<std::string, const Trial*> by_id;
  for (const auto& t : sweep.trials) by_id[t.id] = &t;
  std::optional<std::string> only;
  if (o.only) {
    if (*o.only >= sweep.trials.size())
      throw Error("trial " + std::to_string(*o.only) + ": the sweep has " +
                  std::to_string(sweep.trials.size()) + " trials (0 to " +
                  std::to_string(sweep.trials.size() - 1) + ")");
    only = sweep.trials[*o.only].id;
  }
  const auto total = sweep.trials.size();
  std::size_t finished = 0;
  for (const auto& row : store.rows()) finished += row.status == "done";
  auto say = [&](const std::string& line) {
    if (o.log) *o.log << "[" << finished << "/" << total << "] " << line << std::endl;
  };

  struct Running {
    const Trial* trial;
    Clock::time_point start;
  };
  std::map<pid_t, Running> running;
  const auto owner = this_owner();
  SweepOutcome outcome;
  std::int64_t claimed = 0;
  std::set<std::string> tried;  // each trial at most once per sweep process
  bool exhausted = false;
  const auto workers = static_cast<std::size_t>(std::max(1, o.workers));
  for (;;) {
    while (!exhausted && running.size() < workers && (!o.max_trials || claimed < o.max_trials)) {
      const auto id = store.claim(owner, o.retry_failed, only, tried);
      if (!id) {
        if (only && claimed == 0) say("trial " + *only + " is done or running already");
        exhausted = true;
        break;
      }
      ++claimed;
      tried.insert(*id);
      if (only) exhausted = true;
      const Trial& t = *by_id.at(*id);
      if (const auto summary = sweep_detail::read_summary(t.dir)) {  // finished elsewhere
        store.finish(t.id, true, *summary, sweep_detail::metric_of(*summary, sweep.metric),
                     summary->value("wall_seconds", 0.0), 0, "");
        ++finished;
        continue;
      }
      const bool resume = fs::exists(t.dir / "recipe.yaml") && !latest_checkpoint(t.dir).empty();
      if (!resume && fs::exists(t.dir)) fs::remove_all(t.dir);  // a start that left no checkpoint
      std::vector<std::string> argv{o.graft.string(), "run", sweep.recipe.string()};
      if (sweep.trial_nproc > 1 && !o.srun.empty())  // one rank per task of the allocation
        argv.insert(argv.begin(), {o.srun.string(), "--ntasks=" + std::to_string(sweep.trial_nproc),
                                   "--cpus-per-task=" + std::to_string(sweep.trial_threads),
                                   "--kill-on-bad-exit=1"});
      for (const auto& a : t.run_overrides()) argv.push_back(a);
      argv.insert(argv.end(), {"--threads", std::to_string(sweep.trial_threads)});
      if (sweep.trial_nproc > 1 && o.srun.empty())
        argv.insert(argv.end(), {"--nproc", std::to_string(sweep.trial_nproc)});
      for (const auto& d : o.plugin_dirs) argv.insert(argv.end(), {"--plugin-dir", d});
      if (resume) argv.push_back("--resume");
      const auto log = sweep.dir / "logs" / (t.id + ".log");
      {
        std::ofstream header(log, std::ios::app);
        header << "== " << timestamp() << " UTC, " << owner << ":";
        for (const auto& a : argv) header << " " << a;
        header << "\n";
      }
      running[spawn(argv, log)] = {&t, Clock::now()};
      say((resume ? "resume " : "start  ") + t.id);
    }
    if (running.empty()) break;
    int status = 0;
    const pid_t pid = waitpid(-1, &status, 0);
    if (pid < 0) {
      if (errno == EINTR) continue;
      throw SystemError(std::string("waiting for trials: ") + std::strerror(errno));
    }
    const auto it = running.find(pid);
    if (it == running.end()) continue;
    const Trial& t = *it->second.trial;
    const double wall = std::chrono::duration<double>(Clock::now() - it->second.start).count();
    running.erase(it);
    const int code = WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
    const auto summary = sweep_detail::read_summary(t.dir);
    const bool ok = code == 0 && summary;
    const auto log = sweep.dir / "logs" / (t.id + ".log");
    const auto metric = summary ? sweep_detail::metric_of(*summary, sweep.metric) : std::nullopt;
    store.finish(t.id, ok, summary.value_or(json::object()), metric, wall, code,
                 ok ? "" : error_line(log));
    if (ok) {
      ++finished;
      ++outcome.ran;
      char line[64];
      std::snprintf(line, sizeof line, "  %s %.6g  (%.0f s)", sweep.metric.c_str(),
                    metric.value_or(std::nan("")), wall);
      say("done   " + t.id + line);
    } else {
      ++outcome.failed;
      say("FAILED " + t.id + " (exit " + std::to_string(code) + "): " + error_line(log) +
          "  [log: " + log.string() + "]");
    }
  }
  return outcome;
}

}  // namespace graft
