// The Slurm launcher: a job array script in which task i runs trial i of the sweep.
#include <graft/sweep.h>

#include <sstream>

namespace graft {
namespace fs = std::filesystem;

namespace {

// Single-quoted for bash.
std::string quoted(const std::string& s) {
  std::string out = "'";
  for (char c : s) out += c == '\'' ? std::string("'\\''") : std::string(1, c);
  return out + "'";
}

}  // namespace

std::string slurm_script(const Sweep& sweep, const SlurmOptions& o) {
  if (sweep.trials.empty()) throw Error(sweep.file.string() + ": the sweep has no trials");
  const auto cwd = fs::current_path();
  const auto dir = fs::absolute(sweep.dir).lexically_normal();
  std::ostringstream s;
  s << "#!/bin/bash\n"
    << "# Written by 'graft sweep --launcher slurm' for " << sweep.file.string() << ": "
    << sweep.trials.size() << " trials, one per array task.\n"
    << "# Task i runs trial i against the store "
    << (o.store.empty() ? "in the sweep folder" : o.store.string())
    << "; a trial that is done is skipped, one\n"
    << "# with a checkpoint resumes, so resubmitting the script finishes an interrupted sweep.\n"
    << "# Submit: sbatch " << (dir / "slurm" / "sweep.sbatch").string()
    << "    Results: graft report " << dir.string() << "\n"
    << "#SBATCH --job-name=graft-" << sweep.file.stem().string() << "\n"
    << "#SBATCH --array=0-" << sweep.trials.size() - 1
    << (o.concurrent > 0 ? "%" + std::to_string(o.concurrent) : "") << "\n"
    << "#SBATCH --ntasks=" << sweep.trial_nproc << "\n"
    << "#SBATCH --cpus-per-task=" << sweep.trial_threads << "\n"
    << "#SBATCH --output=" << (dir / "slurm" / "%A_%a.log").string() << "\n";
  if (!o.time.empty()) s << "#SBATCH --time=" << o.time << "\n";
  for (const auto& opt : o.sbatch_options) s << "#SBATCH " << opt << "\n";
  s << "set -euo pipefail\n"
    << "cd " << quoted(cwd.string()) << "\n"
    << "exec " << quoted(o.graft.string()) << " sweep " << quoted(sweep.file.string())
    << " --output " << quoted(sweep.dir.string()) << " --trial \"$SLURM_ARRAY_TASK_ID\"";
  if (!o.store.empty()) s << " --store " << quoted(o.store.string());
  if (sweep.trial_nproc > 1) s << " --srun";  // the trial's ranks: srun, one per task
  for (const auto& d : o.plugin_dirs) s << " --plugin-dir " << quoted(d);
  s << "\n";
  return s.str();
}

}  // namespace graft
