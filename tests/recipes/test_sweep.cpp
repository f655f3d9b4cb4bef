// Sweeps on the tiny llama: expansion of grids, paired settings, cases, random samples and seeds;
// the SQLite trial store (claims, stale owners, rebuilding from run folders); trials as separate
// `graft` processes in parallel; resume after the sweep is killed mid-trial; two sweep processes
// over one store; bit-identical reruns; the report; the Slurm job array script.
#include <graft/distributed.h>
#include <graft/io/json.h>
#include <graft/sweep.h>
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <set>
#include <thread>

#include "recipes/workspace.h"
#include "sweep/svg.h"
#include "test_config.h"

using namespace graft;
using namespace graft::test;

namespace {

std::size_t count(const std::string& text, const std::string& what) {
  std::size_t n = 0;
  for (auto at = text.find(what); at != std::string::npos; at = text.find(what, at + 1)) ++n;
  return n;
}

// The columns of results.csv that hold results (not timings or memory).
std::vector<std::string> result_columns(const fs::path& csv) {
  std::vector<std::string> out;
  std::istringstream in(read(csv));
  std::string line;
  while (std::getline(in, line)) {
    std::vector<std::string> cells;
    std::stringstream ss(line);
    std::string cell;
    while (std::getline(ss, cell, ',')) cells.push_back(cell);
    // setting, label, r, metric mean, std, count, failed, before, trainable, model params
    out.push_back(cells.at(0) + "|" + cells.at(2) + "|" + cells.at(3) + "|" + cells.at(4) + "|" +
                  cells.at(5) + "|" + cells.at(6) + "|" + cells.at(7) + "|" + cells.at(8) + "|" +
                  cells.at(9));
  }
  return out;
}

constexpr const char* kSmallSweep = R"(recipe: lm.yaml
output: sweeps/a
set:
  train.steps: 4
  eval.every: 0
grid:
  methods[0].r: [2, 4]
seeds: [1, 2]
workers: 2
)";

}  // namespace

TEST_CASE("sweep files expand grids, paired settings, cases and random samples over seeds") {
  Workspace w;
  InDir in(w.dir);
  write(w.dir / "e.yaml", R"(recipe: lm.yaml
cases:
  - {label: small, set: {"methods[0].r": 2}}
  - {label: ia3, set: {methods: [{name: ia3}]}}
grid:
  train.lr: [0.01, 0.001]
paired:
  - {train.steps: [2, 4], train.warmup_steps: [0, 1]}
seeds: [0, 1]
)");
  const auto s = load_sweep("e.yaml");
  REQUIRE(s.trials.size() == 16);
  CHECK(s.dir == fs::path("runs/sweeps/e"));
  CHECK(s.axes ==
        std::vector<std::string>{"case", "train.lr", "train.steps", "train.warmup_steps"});
  CHECK(s.trials[0].label == "small, train.lr=0.01, train.steps=2, train.warmup_steps=0");
  CHECK(s.trials[0].seed == 0);
  CHECK(s.trials[1].seed == 1);
  CHECK(s.trials[1].setting == s.trials[0].setting);
  CHECK(s.trials[2].label == "small, train.lr=0.01, train.steps=4, train.warmup_steps=1");
  CHECK(s.trials[8].overrides.front() == "methods=[{name: ia3}]");
  CHECK(s.trials[0].run_overrides().back() == "output.dir=runs/sweeps/e/trials/" + s.trials[0].id);
  std::set<std::string> ids;
  for (const auto& t : s.trials) ids.insert(t.id);
  CHECK(ids.size() == 16);
  CHECK(load_sweep("e.yaml").trials[5].id == s.trials[5].id);  // stable
  load_plugins();
  validate_sweep(s);

  write(w.dir / "r.yaml", R"(recipe: lm.yaml
random:
  samples: 6
  seed: 3
  keys:
    train.lr: {log_uniform: [1.0e-4, 1.0e-2]}
    methods[0].r: {choice: [2, 4, 8]}
    train.warmup_steps: {int_uniform: [0, 3]}
)");
  const auto r = load_sweep("r.yaml");
  REQUIRE(r.trials.size() == 6);  // one seed: the recipe's
  for (const auto& t : r.trials) {
    CHECK(t.seed == 7);
    const double lr = std::stod(t.values[0].second);
    CHECK(lr >= 1e-4);
    CHECK(lr <= 1e-2);
    CHECK(std::set<std::string>{"2", "4", "8"}.count(t.values[1].second) == 1);
    const int warm = std::stoi(t.values[2].second);
    CHECK(warm >= 0);
    CHECK(warm <= 3);
  }
  CHECK(load_sweep("r.yaml").to_json() == r.to_json());  // the same draws every time

  // Errors name the place.
  write(w.dir / "bad1.yaml", "recipe: lm.yaml\ngrdi:\n  train.lr: [1]\n");
  CHECK_THROWS_WITH_AS(load_sweep("bad1.yaml"),
                       "bad1.yaml:2:1: grdi: unknown key (did you mean \"grid\"?)", ParamError);
  write(w.dir / "bad2.yaml",
        "recipe: lm.yaml\npaired:\n  - {train.steps: [1, 2], train.lr: [0.1]}\n");
  CHECK_THROWS_WITH_AS(load_sweep("bad2.yaml"),
                       doctest::Contains("bad2.yaml:3:27: paired[0].train.lr: paired lists change "
                                         "together, so they need the same length"),
                       ParamError);
  write(w.dir / "bad3.yaml", "recipe: lm.yaml\nseeds: [1, 1]\n");
  CHECK_THROWS_WITH_AS(load_sweep("bad3.yaml"), doctest::Contains("seed 1 is listed twice"),
                       ParamError);
  write(w.dir / "bad4.yaml", "recipe: lm.yaml\ngrid:\n  train.stpes: [1, 2]\n");
  CHECK_THROWS_WITH_AS(validate_sweep(load_sweep("bad4.yaml")),
                       doctest::Contains("unknown key (did you mean \"steps\"?)"), ParamError);
  write(w.dir / "bad5.yaml", "recipe: lm.yaml\nmetric: accuracy\nset:\n  eval.metrics: [loss]\n");
  CHECK_THROWS_WITH_AS(validate_sweep(load_sweep("bad5.yaml")),
                       doctest::Contains("the sweep reports \"accuracy\""), ParamError);
}

TEST_CASE("the trial store: atomic claims, dead owners, rebuilt from the run folders") {
  Workspace w;
  InDir in(w.dir);
  write(w.dir / "s.yaml", kSmallSweep);
  const auto s = load_sweep("s.yaml");
  TrialStore a("sweeps/a/sweep.db"), b("sweeps/a/sweep.db");
  a.sync(s);
  b.sync(s);
  std::set<std::string> claimed;
  for (int i = 0; i < 4; ++i) {
    auto id = (i % 2 ? a : b).claim(this_owner(), false);
    REQUIRE(id);
    CHECK(claimed.insert(*id).second);  // never the same trial twice
  }
  CHECK_FALSE(a.claim(this_owner(), false));
  CHECK_FALSE(b.claim(this_owner(), false, s.trials[1].id));  // running in a live process

  // A trial whose owner died is claimed again.
  const pid_t dead = fork();
  if (dead == 0) _exit(0);
  wait_for(dead);
  const auto host = this_owner().substr(0, this_owner().rfind(':'));
  TrialStore c("sweeps/b.db");
  c.sync(s);
  REQUIRE(c.claim(host + ":" + std::to_string(dead), false) == s.trials[0].id);
  CHECK(c.claim(this_owner(), false) == s.trials[0].id);
  CHECK(c.rows()[0].attempts == 2);
  // One running on another host is left alone, unless named (a requeued Slurm array task).
  REQUIRE(c.claim("elsewhere.example:1", false) == s.trials[1].id);
  CHECK(c.claim(this_owner(), false) == s.trials[2].id);
  CHECK(c.claim(this_owner(), false) == s.trials[3].id);
  CHECK_FALSE(c.claim(this_owner(), false));
  CHECK(c.claim(this_owner(), false, s.trials[1].id) == s.trials[1].id);

  // The folders are the truth: a summary makes a trial done, losing it makes it pending.
  write(s.trials[3].dir / "summary.json", R"({"eval_after": {"loss": 1.5}, "wall_seconds": 2})");
  c.sync(s);
  CHECK(c.rows()[3].status == "done");
  CHECK(c.rows()[3].metric == 1.5);
  TrialStore fresh("sweeps/c.db");
  fresh.sync(s);
  CHECK(fresh.rows()[3].status == "done");
  fs::remove(s.trials[3].dir / "summary.json");
  c.sync(s);
  CHECK(c.rows()[3].status == "pending");

  // An edited sweep: rows of trials it no longer has leave the store.
  std::string fewer_text = kSmallSweep;
  fewer_text.replace(fewer_text.find("seeds: [1, 2]"), 13, "seeds: [1]");
  write(w.dir / "fewer.yaml", fewer_text);
  const auto fewer = load_sweep("fewer.yaml");
  REQUIRE(fewer.trials.size() == 2);
  c.sync(fewer);
  CHECK(c.rows().size() == 2);
  CHECK_THROWS_WITH_AS(TrialStore("/proc/nope/x.db"), doctest::Contains("/proc/nope/x.db"),
                       FileError);
}

TEST_CASE("graft sweep runs trials in parallel processes, reruns are bit-identical, and reports") {
  Workspace w;
  InDir in(w.dir);
  write(w.dir / "s.yaml", kSmallSweep);
  REQUIRE(graft_cli("sweep s.yaml", w.dir / "a.log") == 0);
  const auto out = read(w.dir / "a.log");
  CHECK(out.find("[4/4] done") != std::string::npos);
  CHECK(out.find("| methods[0].r=2 | ") != std::string::npos);
  const auto s = load_sweep("s.yaml");
  for (const auto& t : s.trials) {
    CHECK(fs::exists(t.dir / "summary.json"));
    CHECK(count(read("sweeps/a/logs/" + t.id + ".log"), "== ") == 1);
  }
  for (const auto* f : {"results.csv", "results.md", "trials.csv", "plots/loss_vs_methods_0__r.svg",
                        "plots/learning_curves.svg"})
    CHECK_MESSAGE(fs::exists(fs::path("sweeps/a/report") / f), f);
  const auto csv = read("sweeps/a/report/results.csv");
  CHECK(csv.rfind("setting,label,methods[0].r,loss_mean,loss_std,count,failed,", 0) == 0);
  CHECK(count(csv, ",2,0,") == 2);   // two settings, two seeds each, none failed
  CHECK(count(csv, ",yes\n") == 1);  // one best setting
  CHECK(read("sweeps/a/report/plots/learning_curves.svg").rfind("<svg", 0) == 0);

  // Run again: nothing is rerun.
  REQUIRE(graft_cli("sweep s.yaml", w.dir / "again.log") == 0);
  for (const auto& t : s.trials) CHECK(count(read("sweeps/a/logs/" + t.id + ".log"), "== ") == 1);

  // The same sweep elsewhere gives bit-identical numbers and metrics.
  REQUIRE(graft_cli("sweep s.yaml --output sweeps/b --workers 1", w.dir / "b.log") == 0);
  CHECK(result_columns("sweeps/a/report/results.csv") ==
        result_columns("sweeps/b/report/results.csv"));
  const auto b = load_sweep("s.yaml", "sweeps/b");
  for (std::size_t i = 0; i < s.trials.size(); ++i) {
    CHECK(read(s.trials[i].dir / "metrics.jsonl") == read(b.trials[i].dir / "metrics.jsonl"));
    CHECK(read(s.trials[i].dir / "adapter/adapter.safetensors") ==
          read(b.trials[i].dir / "adapter/adapter.safetensors"));
  }

  // The store is rebuilt from the folders, and the report with it.
  fs::remove("sweeps/a/sweep.db");
  REQUIRE(graft_cli("report sweeps/a", w.dir / "r.log") == 0);
  CHECK(result_columns("sweeps/a/report/results.csv") ==
        result_columns("sweeps/b/report/results.csv"));
  TrialStore rebuilt("sweeps/a/sweep.db");
  for (const auto& row : rebuilt.rows()) CHECK(row.status == "done");

  CHECK(graft_cli("report nowhere", w.dir / "n.log") == 2);  // the input is wrong
  CHECK(read(w.dir / "n.log") ==
        "graft: error: nowhere: not a sweep folder (no sweep.json): give the output folder of "
        "'graft sweep'\n");
  write(w.dir / "bad.yaml", "recipe: lm.yaml\noutput: sweeps/bad\ngrid:\n  train.stpes: [1]\n");
  CHECK(graft_cli("sweep bad.yaml", w.dir / "bad.log") == 2);
  CHECK(read(w.dir / "bad.log").find("unknown key (did you mean \"steps\"?)") != std::string::npos);
  CHECK_FALSE(fs::exists("sweeps/bad"));  // nothing written for a bad sweep
}

TEST_CASE("a failing trial is reported with its error, and the others still run") {
  Workspace w;
  InDir in(w.dir);
  write(w.dir / "f.yaml", R"(recipe: lm.yaml
output: sweeps/f
set:
  train.steps: 3
  eval.every: 0
cases:
  - {label: good, set: {"methods[0].targets": [all-linear]}}
  - {label: bad, set: {"methods[0].targets": [ffn.nope]}}
)");
  CHECK(graft_cli("sweep f.yaml", w.dir / "f.log") == 1);
  const auto out = read(w.dir / "f.log");
  CHECK(out.find("FAILED bad-") != std::string::npos);
  CHECK(out.find("1 trial failed") != std::string::npos);
  const auto md = read("sweeps/f/report/results.md");
  CHECK(md.find("| good | ") != std::string::npos);
  CHECK(md.find("| bad | - | - | - ± - | 0 (1 failed) |") != std::string::npos);
  CHECK(md.find("## Failed trials") != std::string::npos);
  CHECK(md.find("ffn.nope") != std::string::npos);
  // Failed trials are left alone unless asked (and still make the exit status 1).
  CHECK(graft_cli("sweep f.yaml", w.dir / "f2.log") == 1);
  CHECK(read(w.dir / "f2.log").find("start") == std::string::npos);
  CHECK(read(w.dir / "f2.log").find("1 trial failed") != std::string::npos);
  CHECK(graft_cli("sweep f.yaml --retry-failed", w.dir / "f3.log") == 1);
  CHECK(read(w.dir / "f3.log").find("start  bad-") != std::string::npos);
}

TEST_CASE("a sweep killed mid-trial resumes that trial from its checkpoint, exactly") {
  Workspace w;
  InDir in(w.dir);
  write(w.dir / "k.yaml", R"(recipe: lm.yaml
output: sweeps/k
set:
  train.steps: 600
  train.log_every: 50
  eval.every: 0
  checkpoint.every: 10
  checkpoint.keep: 1
seeds: [5]
)");
  const auto s = load_sweep("k.yaml");
  const auto& t = s.trials.at(0);
  const pid_t sweep = start_graft({"sweep", "k.yaml"}, w.dir / "k1.log");
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(120);
  auto has_checkpoint = [&] { return !latest_checkpoint(t.dir).empty(); };
  while (!has_checkpoint() && std::chrono::steady_clock::now() < deadline)
    std::this_thread::sleep_for(std::chrono::milliseconds(5));
  kill(sweep, SIGKILL);
  wait_for(sweep);
  std::this_thread::sleep_for(std::chrono::milliseconds(300));  // the trial follows its sweep
  REQUIRE(has_checkpoint());
  REQUIRE_FALSE(fs::exists(t.dir / "summary.json"));

  REQUIRE(graft_cli("sweep k.yaml", w.dir / "k2.log") == 0);
  const auto log = read("sweeps/k/logs/" + t.id + ".log");
  CHECK(count(log, "== ") == 2);
  CHECK(log.find("resumed from") != std::string::npos);
  CHECK(TrialStore("sweeps/k/sweep.db").rows()[0].attempts == 2);

  REQUIRE(graft_cli("sweep k.yaml --output sweeps/k-clean", w.dir / "k3.log") == 0);
  const auto clean = load_sweep("k.yaml", "sweeps/k-clean").trials[0];
  CHECK(read(t.dir / "metrics.jsonl") == read(clean.dir / "metrics.jsonl"));
  CHECK(read(t.dir / "adapter/adapter.safetensors") ==
        read(clean.dir / "adapter/adapter.safetensors"));
}

TEST_CASE("two sweep processes over one store run every trial exactly once") {
  Workspace w;
  InDir in(w.dir);
  write(w.dir / "c.yaml", R"(recipe: lm.yaml
output: sweeps/c
set:
  train.steps: 30
  eval.every: 0
grid:
  methods[0].r: [2, 4, 8]
seeds: [1, 2]
)");
  const pid_t one = start_graft({"sweep", "c.yaml"}, w.dir / "one.log");
  const pid_t two = start_graft({"sweep", "c.yaml"}, w.dir / "two.log");
  CHECK(wait_for(one) == 0);
  CHECK(wait_for(two) == 0);
  const auto s = load_sweep("c.yaml");
  for (const auto& t : s.trials) {
    CHECK(count(read("sweeps/c/logs/" + t.id + ".log"), "== ") == 1);
    CHECK(fs::exists(t.dir / "summary.json"));
  }
  for (const auto& row : TrialStore("sweeps/c/sweep.db").rows()) {
    CHECK(row.status == "done");
    CHECK(row.attempts == 1);
  }
  // Between them the two processes ran all six.
  CHECK(count(read(w.dir / "one.log"), "] done") + count(read(w.dir / "two.log"), "] done") == 6);
}

TEST_CASE("--launcher slurm writes a job array whose task i runs trial i") {
  Workspace w;
  InDir in(w.dir);
  write(w.dir / "s.yaml", kSmallSweep);
  REQUIRE(graft_cli("sweep s.yaml --launcher slurm --output sweeps/sl --workers 2 "
                    "--sbatch=--partition=cpu --time 00:10:00",
                    w.dir / "sl.log") == 0);
  const auto script = read("sweeps/sl/slurm/sweep.sbatch");
  CHECK(script.rfind("#!/bin/bash\n", 0) == 0);
  CHECK(script.find("#SBATCH --array=0-3%2\n") != std::string::npos);
  CHECK(script.find("#SBATCH --cpus-per-task=1\n") != std::string::npos);
  CHECK(script.find("#SBATCH --partition=cpu\n") != std::string::npos);
  CHECK(script.find("#SBATCH --time=00:10:00\n") != std::string::npos);
  CHECK(script.find("#SBATCH --output=" + (fs::current_path() / "sweeps/sl/slurm").string() +
                    "/%A_%a.log\n") != std::string::npos);
  CHECK(script.find("cd '" + fs::current_path().string() + "'\n") != std::string::npos);
  CHECK(script.find("exec '" + fs::canonical(GRAFT_EXECUTABLE).string() +
                    "' sweep 's.yaml' --output 'sweeps/sl' --trial \"$SLURM_ARRAY_TASK_ID\"\n") !=
        std::string::npos);
  CHECK(TrialStore("sweeps/sl/sweep.db").rows().size() == 4);

  // What one array task does: run its trial and only that one.
  const auto task = "cd / && SLURM_ARRAY_TASK_ID=2 bash " +
                    shell_quote((w.dir / "sweeps/sl/slurm/sweep.sbatch").string()) + " >" +
                    shell_quote((w.dir / "task.log").string()) + " 2>&1";
  REQUIRE(std::system(task.c_str()) == 0);
  const auto rows = TrialStore("sweeps/sl/sweep.db").rows();
  for (std::size_t i = 0; i < rows.size(); ++i)
    CHECK(rows[i].status == (i == 2 ? "done" : "pending"));
  CHECK(graft_cli("sweep s.yaml --output sweeps/sl --trial 9", w.dir / "t9.log") == 2);
  CHECK(read(w.dir / "t9.log").find("trial 9: the sweep has 4 trials (0 to 3)") !=
        std::string::npos);
  if (std::system("command -v sbatch >/dev/null 2>&1") != 0) {
    CHECK(graft_cli("sweep s.yaml --output sweeps/sl --launcher slurm --submit",
                    w.dir / "sub.log") == 1);  // the machine lacks Slurm: not the input's fault
    CHECK(read(w.dir / "sub.log").find("submit it by hand with: sbatch") != std::string::npos);
  }
}

TEST_CASE("trial_nproc: each trial a distributed run, with --nproc here and srun under Slurm") {
  if (distributed_backends().empty()) return;
  Workspace w;
  InDir in(w.dir);
  write(w.dir / "d.yaml", R"(recipe: lm.yaml
set:
  train.steps: 2
  train.batch_size: 4
  eval.every: 0
  eval.batches: 1
seeds: [1]
trial_nproc: 2
)");
  REQUIRE(graft_cli("sweep d.yaml --output sweeps/d", w.dir / "d.log") == 0);
  const auto sweep = load_sweep("d.yaml", "sweeps/d");
  CHECK(io::read_json_file(sweep.trials[0].dir / "summary.json").at("world_size") == 2);

  REQUIRE(graft_cli("sweep d.yaml --launcher slurm --output sweeps/ds", w.dir / "ds.log") == 0);
  const auto script = read("sweeps/ds/slurm/sweep.sbatch");
  CHECK(script.find("#SBATCH --ntasks=2\n") != std::string::npos);
  CHECK(script.find(" --trial \"$SLURM_ARRAY_TASK_ID\" --srun\n") != std::string::npos);
  // The array task as Slurm runs it, srun being a stand-in that starts the tasks here.
  const auto bin = w.dir / "bin";
  fs::create_directories(bin);
  fs::create_symlink(fs::path(GRAFT_TESTS_SOURCE_DIR) / "integration" / "fake-srun", bin / "srun");
  const auto task =
      "cd / && PATH=" + shell_quote(bin.string()) +
      ":\"$PATH\" SLURM_ARRAY_TASK_ID=0 SLURM_JOB_ID=" + std::to_string(getpid() % 20000) +
      " SLURM_JOB_NODELIST=localhost bash " +
      shell_quote((w.dir / "sweeps/ds/slurm/sweep.sbatch").string()) + " >" +
      shell_quote((w.dir / "task.log").string()) + " 2>&1";
  CHECK(std::system(task.c_str()) == 0);
  const auto ds = load_sweep("d.yaml", "sweeps/ds");
  CHECK(io::read_json_file(ds.trials[0].dir / "manifest.json").at("distributed").at("launcher") ==
        "slurm");
}

TEST_CASE("report plots: 19+ series stay distinguishable, and a line's seed spread is a band") {
  svg::Chart chart;
  chart.title = "t";
  for (int i = 0; i < 24; ++i) {
    svg::Series s;
    s.name = "series " + std::to_string(i);
    s.x = {1, 2, 3};
    s.y = {1.0 + i, 2.0 + i, 3.0 + i};
    s.err = {0.5, 0.5, 0.5};
    chart.series.push_back(s);
  }
  const auto out = svg::render(chart);
  // Each legend entry: a short line with its colour and dash pattern; all 24 differ.
  std::set<std::string> styles;
  std::size_t at = 0, entries = 0;
  while ((at = out.find("stroke-width=\"2\"", at)) != std::string::npos) {
    const auto begin = out.rfind("<line", at), end = out.find("/>", at);
    auto line = out.substr(begin, end - begin);
    line = line.substr(line.find("stroke=\""));  // style only, not position
    styles.insert(line);
    ++entries;
    ++at;
  }
  CHECK(entries == 24);
  CHECK(styles.size() == 24);
  // One translucent band per series, and no error bars on lines.
  std::size_t bands = 0;
  for (at = 0; (at = out.find("fill-opacity=\"0.15\"", at)) != std::string::npos; ++at) ++bands;
  CHECK(bands == 24);
  chart.series.resize(1);
  chart.series[0].line = false;  // points keep their error bars
  CHECK(svg::render(chart).find("fill-opacity") == std::string::npos);
}
