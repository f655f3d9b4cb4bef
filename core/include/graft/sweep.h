// Sweeps: one base recipe run over a grid, paired settings, named cases and random samples of
// overrides, times a list of seeds. Every trial is a separate `graft run` process with its own run
// folder; a SQLite store in the sweep folder tracks which trials are pending, running, done or
// failed, so an interrupted sweep resumes and two sweep processes never run one trial twice. The
// run folders are the source of truth: the store is rebuilt from them whenever a sweep or a report
// opens it.
//
// A sweep folder (output) holds:
//   sweep.json       the expanded sweep: base recipe, metric, swept keys, every trial
//   sweep.db         the trial store (SQLite)
//   trials/<id>/     one run folder per trial (recipe.yaml, metrics.jsonl, summary.json, ...)
//   logs/<id>.log    each trial's output, appended across attempts
//   report/          results.csv, results.md, trials.csv, plots/*.svg (graft report)
//   slurm/           sweep.sbatch and the array tasks' logs (--launcher slurm)
#pragma once

#include <graft/params.h>

#include <cstdint>
#include <filesystem>
#include <iosfwd>
#include <nlohmann/json.hpp>
#include <optional>
#include <set>
#include <string>
#include <utility>
#include <vector>

namespace graft {

/// One run of the sweep: a setting (a list of overrides) with one seed.
struct Trial {
  std::size_t index = 0;  ///< position in the expansion (settings in order, seeds innermost)
  std::string id;         ///< folder name: "<label slug>-<setting hash>-seed<S>"
  std::string setting;    ///< the setting's hash (8 hex digits), shared by its seeds
  std::string label;      ///< "baseline" (a case), "train.lr=0.001, methods[0].r=8" (swept values)
  std::uint64_t seed = 0;
  std::vector<std::string> overrides;  ///< key=value applied to the base recipe, in order
  std::vector<std::pair<std::string, std::string>> values;  ///< swept axis -> value text
  std::filesystem::path dir;                                ///< the trial's run folder

  /// The overrides `graft run` gets: the setting's, then seed=S and output.dir=<dir>.
  std::vector<std::string> run_overrides() const;
};

struct Sweep {
  std::filesystem::path file;    ///< the sweep file ("" when read back from sweep.json)
  std::filesystem::path recipe;  ///< the base recipe
  std::filesystem::path dir;     ///< the sweep folder
  std::string metric = "loss";   ///< an eval metric of summary.json's eval_after
  bool lower_is_better = true;
  int trial_threads = 1;  ///< intra-op threads of each trial (fixed: results reproduce)
  int trial_nproc = 1;    ///< processes of each trial (a distributed run: graft run --nproc, srun)
  int workers = 1;        ///< trials run at once (the command line may override)
  std::vector<std::string> axes;  ///< swept keys in order ("case" for named cases)
  std::vector<Trial> trials;

  nlohmann::json to_json() const;
  static Sweep from_json(const nlohmann::json& j, const std::filesystem::path& dir);
};

/// Reads and expands a sweep file; `output` (when not empty) replaces its output folder. Every
/// bad key or value is a ParamError with file:line:column.
Sweep load_sweep(const std::filesystem::path& file, const std::filesystem::path& output = {});

/// Loads every trial's recipe (with its overrides) and validates it, so that a bad setting is
/// reported before any trial runs. Needs the plugins loaded.
void validate_sweep(const Sweep& sweep);

/// The trial store: one SQLite file, shared by every process that runs the sweep's trials.
class TrialStore {
 public:
  explicit TrialStore(const std::filesystem::path& file);
  ~TrialStore();
  TrialStore(const TrialStore&) = delete;
  TrialStore& operator=(const TrialStore&) = delete;

  /// Adds the trials it does not hold, then brings every row in line with the trial's run
  /// folder (summary.json there: done with its numbers; a row marked done whose folder lost its
  /// summary: pending again) and drops the rows of trials the sweep no longer has. This is also
  /// how a lost or deleted store is rebuilt.
  void sync(const Sweep& sweep);

  /// Claims the next trial to run for `owner` (host:pid) and returns its id: a pending trial (or
  /// a failed one, with `retry_failed`), or one marked running by a process of this host that no
  /// longer exists. With `only`, claims that trial alone unless it is done or running in a live
  /// process of this host (one marked running on another host is taken over: Slurm runs one
  /// instance of an array task at a time). Atomic across processes (BEGIN IMMEDIATE).
  /// Trials in `skip` (those this process has tried already) are never claimed.
  std::optional<std::string> claim(const std::string& owner, bool retry_failed,
                                   const std::optional<std::string>& only = std::nullopt,
                                   const std::set<std::string>& skip = {});

  /// Records a finished attempt: done (with the summary) or failed (with the error line).
  void finish(const std::string& id, bool ok, const nlohmann::json& summary,
              std::optional<double> metric, double wall_seconds, int exit_code,
              const std::string& error);

  struct Row {
    std::string id, status, owner, error;
    std::int64_t attempts = 0;
    std::optional<double> metric;
  };
  std::vector<Row> rows() const;

 private:
  struct Db;
  Db* db_;
};

/// "host:pid" of this process.
std::string this_owner();

struct SweepOptions {
  int workers = 1;
  std::filesystem::path graft;           ///< the graft executable that runs trials
  std::filesystem::path store;           ///< "" = <sweep dir>/sweep.db
  std::vector<std::string> plugin_dirs;  ///< passed on to every trial
  std::optional<std::size_t> only;       ///< run just this trial (by index): a Slurm array task
  std::int64_t max_trials = 0;           ///< stop claiming after this many (0 = no limit)
  /// Slurm's srun: a trial of several processes starts its ranks with it (inside an allocation
  /// of that many tasks: the job array script); empty: with graft run --nproc on this machine.
  std::filesystem::path srun;
  bool retry_failed = false;
  std::ostream* log = nullptr;  ///< progress lines (none when null)
};

struct SweepOutcome {
  int ran = 0, failed = 0;
};

/// Writes sweep.json, syncs the store and runs trials in up to `workers` child processes until
/// none is left to claim. A trial whose folder has a checkpoint resumes from it.
SweepOutcome run_sweep(const Sweep& sweep, const SweepOptions& options);

/// Reads a sweep folder (sweep.json and the trials' run folders, rebuilding the store), writes
/// report/results.csv, results.md, trials.csv and plots/*.svg, and returns the Markdown table.
std::string report_sweep(const std::filesystem::path& dir);

struct SlurmOptions {
  std::filesystem::path graft;  ///< absolute path of the graft executable
  int concurrent = 0;           ///< at most this many array tasks at once (0 = no limit)
  std::string time;             ///< --time per task ("" = the partition's default)
  std::vector<std::string> sbatch_options;  ///< extra "#SBATCH" lines, e.g. "--partition=cpu"
  std::vector<std::string> plugin_dirs;
  std::filesystem::path store;  ///< "" = the sweep's own store
};

/// The job array script: task i runs trial i (`graft sweep FILE --trial i`) against the store.
std::string slurm_script(const Sweep& sweep, const SlurmOptions& options);

}  // namespace graft
