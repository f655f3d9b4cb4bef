// Distributed data parallel over loopback on the tiny llama: the launch read from torchrun's and
// Slurm's environments; two ranks train exactly what one process accumulating the same two
// shards trains (bit for bit), and what one process with the whole batch trains within the
// rounding of the reordered sums; resume with the same number of ranks and the refusal of
// another; a rank that cannot join, and a rank that dies, stop the run with one line.
#include <graft/distributed.h>
#include <graft/io/json.h>
#include <graft/io/safetensors.h>
#include <signal.h>

#include <map>

#include "numeric.h"
#include "recipes/workspace.h"

using namespace graft;
using namespace graft::test;

namespace {

using Env = std::map<std::string, std::string>;

Launch launch_of(const Env& env) {
  return launch_from_environment([&](const char* name) -> const char* {
    const auto it = env.find(name);
    return it == env.end() ? nullptr : it->second.c_str();
  });
}

std::string error_of(const Env& env) {
  try {
    launch_of(env);
  } catch (const Error& e) {
    return e.what();
  }
  return "";
}

io::TensorMap adapter(const fs::path& run) {
  return io::read_safetensors((run / "adapter" / "adapter.safetensors").string()).tensors;
}

std::size_t lines_of(const std::string& text) {
  return static_cast<std::size_t>(std::count(text.begin(), text.end(), '\n'));
}

// The tiny llama's recipe with dropout-free methods, no evaluation during training, one thread
// per process: what two ranks and one process compute is then determined by the data alone.
std::string base(const std::string& methods, const std::string& out) {
  return "lm.yaml 'methods=" + methods + "' train.steps=4 eval.every=0 eval.batches=2 " +
         "train.schedule=constant train.warmup_steps=0 output.dir=" + out + " --threads 1";
}

}  // namespace

TEST_CASE("a distributed launch comes from torchrun's or Slurm's environment") {
  CHECK_FALSE(launch_of({}).distributed());
  const auto t = launch_of({{"RANK", "3"},
                            {"WORLD_SIZE", "4"},
                            {"LOCAL_RANK", "1"},
                            {"LOCAL_WORLD_SIZE", "2"},
                            {"MASTER_ADDR", "node7"},
                            {"MASTER_PORT", "29400"}});
  CHECK(t.distributed());
  CHECK(t.rank == 3);
  CHECK(t.world_size == 4);
  CHECK(t.local_rank == 1);
  CHECK(t.local_world_size == 2);
  CHECK(t.master_addr == "node7");
  CHECK(t.master_port == 29400);
  CHECK(t.launcher == "torchrun");

  const auto s = launch_of({{"SLURM_PROCID", "5"},
                            {"SLURM_NTASKS", "8"},
                            {"SLURM_LOCALID", "1"},
                            {"SLURM_NTASKS_PER_NODE", "4"},
                            {"SLURM_JOB_NODELIST", "gpu[07-08],cpu1"},
                            {"SLURM_JOB_ID", "123456"}});
  CHECK(s.rank == 5);
  CHECK(s.world_size == 8);
  CHECK(s.local_rank == 1);
  CHECK(s.local_world_size == 4);
  CHECK(s.master_addr == "gpu07");
  CHECK(s.master_port == 20000 + 123456 % 20000);
  CHECK(s.launcher == "slurm");
  // MASTER_ADDR and MASTER_PORT win over what Slurm's variables imply.
  const auto m = launch_of({{"SLURM_PROCID", "0"},
                            {"SLURM_NTASKS", "2"},
                            {"SLURM_JOB_NODELIST", "a1"},
                            {"MASTER_ADDR", "10.0.0.1"},
                            {"MASTER_PORT", "1234"}});
  CHECK(m.master_addr == "10.0.0.1");
  CHECK(m.master_port == 1234);
  // torchrun's variables come first when both are there (torchrun inside an allocation).
  CHECK(
      launch_of({{"RANK", "0"}, {"WORLD_SIZE", "1"}, {"SLURM_PROCID", "1"}, {"SLURM_NTASKS", "2"}})
          .launcher == "torchrun");

  CHECK(first_slurm_host("node1") == "node1");
  CHECK(first_slurm_host("a,b") == "a");
  CHECK(first_slurm_host("rack[1-2]-n[07,9],x") == "rack1-n07");
  CHECK_THROWS_WITH_AS(first_slurm_host("n[1-2"), doctest::Contains("unclosed"), Error);

  CHECK(error_of({{"RANK", "0"}}).find("WORLD_SIZE") != std::string::npos);
  CHECK(error_of({{"RANK", "2"}, {"WORLD_SIZE", "2"}, {"MASTER_ADDR", "h"}, {"MASTER_PORT", "1"}})
            .find("RANK=2: expected a whole number from 0 to 1") != std::string::npos);
  CHECK(error_of({{"RANK", "0"}, {"WORLD_SIZE", "2"}}).find("MASTER_ADDR and MASTER_PORT") !=
        std::string::npos);
  CHECK(error_of({{"RANK", "x"}, {"WORLD_SIZE", "2"}, {"MASTER_ADDR", "h"}, {"MASTER_PORT", "1"}})
            .find("RANK=x") != std::string::npos);
  CHECK(error_of({{"SLURM_PROCID", "0"}, {"SLURM_NTASKS", "2"}}).find("SLURM_JOB_NODELIST") !=
        std::string::npos);
}

TEST_CASE(
    "two ranks train what one process trains, for LoRA, a bottleneck adapter, prefix "
    "tuning and full fine-tuning") {
  if (distributed_backends().empty()) {
    MESSAGE("this graft was built without Gloo: distributed runs are refused (tested in cli.sh)");
    return;
  }
  Workspace w;
  InDir in(w.dir);
  const std::map<std::string, std::string> methods = {
      {"lora", "[{name: lora, r: 4, targets: [all-linear]}]"},
      {"bottleneck", "[{name: bottleneck, reduction_factor: 4}]"},
      {"prefix_tuning", "[{name: prefix_tuning, num_virtual_tokens: 3}]"},
      {"full", "[{name: full}]"}};
  const auto config = tiny_config("llama");
  for (const auto& [name, list] : methods) {
    CAPTURE(name);
    const auto log = w.dir / (name + ".log");
    // Two ranks with a global batch of 4 (AdamW, 4 steps) against one process that accumulates
    // the same two halves: the same sums in the same order (a + b is b + a in floating point), so
    // the same bits.
    REQUIRE(graft_cli("run " + base(list, name + "/two") + " train.batch_size=4 --nproc 2", log) ==
            0);
    REQUIRE(graft_cli("run " + base(list, name + "/acc") +
                          " train.batch_size=2 train.gradient_accumulation=2",
                      log) == 0);
    const auto two = adapter(name + "/two"), acc = adapter(name + "/acc");
    REQUIRE(two.size() == acc.size());
    for (const auto& [k, v] : two) {
      CAPTURE(k);
      CHECK(torch::equal(v, acc.at(k)));
    }
    CHECK(io::read_json_file(name + "/two/summary.json").at("world_size") == 2);
    CHECK(io::read_json_file(name + "/two/manifest.json").at("distributed").at("backend") ==
          "gloo");

    // One process with the whole batch sums the same terms in another order. One SGD step, whose
    // update is lr times the gradient: the two runs differ by at most twice gamma_n of that
    // update, n being the longest chain of a gradient (the backward's products over the forward's
    // chain, twice, plus the sum over the batch's tokens), plus the rounding of the updates. The
    // update's size is read from a run with twice the learning rate (its difference from lr's).
    const std::string sgd =
        " train.optimizer=sgd train.momentum=0 train.steps=1 train.batch_size=4 train.lr=0.01";
    REQUIRE(graft_cli("run " + base(list, name + "/two1") + sgd + " --nproc 2", log) == 0);
    REQUIRE(graft_cli("run " + base(list, name + "/one1") + sgd, log) == 0);
    REQUIRE(graft_cli("run " + base(list, name + "/twice") + sgd + " train.lr=0.02", log) == 0);
    const auto two1 = adapter(name + "/two1"), one1 = adapter(name + "/one1"),
               twice = adapter(name + "/twice");
    const std::int64_t tokens = 4 * 32;
    const auto n = 2 * forward_terms(config, 32) + tokens;
    bool moved = false;
    for (const auto& [k, v] : one1) {
      CAPTURE(k);
      const auto step = max_diff(v, twice.at(k)) + 4.0 * kUnit32 * max_abs(v);
      moved |= max_diff(v, twice.at(k)) > 0;
      const double tol = 2.0 * gamma32(n) * step + 2.0 * kUnit32 * max_abs(v);
      GRAFT_CHECK_CLOSE(two1.at(k), v, tol);
    }
    CHECK(moved);
    // Evaluation is sharded by batch (rank k scores batches k, k + 2, ...): each batch's sum is
    // the one process's, and two sums add the same in either order.
    const auto before = io::read_json_file(name + "/one1/summary.json").at("eval_before");
    CHECK(io::read_json_file(name + "/two1/summary.json").at("eval_before") == before);
    CHECK(io::read_json_file(name + "/two/summary.json").at("eval_before") == before);
  }
}

TEST_CASE("a distributed run resumes with its number of ranks and refuses another") {
  if (distributed_backends().empty()) return;
  Workspace w;
  InDir in(w.dir);
  const std::string lora = "[{name: lora, r: 4, targets: [all-linear]}]";
  const auto log = w.dir / "log";
  REQUIRE(graft_cli("run " + base(lora, "whole") + " train.batch_size=4 --nproc 2", log) == 0);
  REQUIRE(graft_cli("run " + base(lora, "cut") + " train.batch_size=4 --nproc 2 --stop-at 2",
                    log) == 0);
  CHECK(graft_cli("run " + base(lora, "cut") + " train.batch_size=4 --resume", log) == 2);
  const auto said = read(log);
  CHECK(lines_of(said) == 1);
  CHECK(said.find("written by a run of 2 processes, resumed with 1") != std::string::npos);
  CHECK(said.find("--nproc 2") != std::string::npos);
  REQUIRE(graft_cli("run " + base(lora, "cut") + " train.batch_size=4 --nproc 2 --resume", log) ==
          0);
  const auto a = adapter("whole"), b = adapter("cut");
  for (const auto& [k, v] : a) CHECK(torch::equal(v, b.at(k)));
}

TEST_CASE(
    "ranks started with torchrun's or Slurm's variables form one run, and one that cannot "
    "join or dies stops the run with one line") {
  if (distributed_backends().empty()) return;
  Workspace w;
  InDir in(w.dir);
  const std::string lora = "[{name: lora, r: 4, targets: [all-linear]}]";
  auto args = [&](const std::string& out) {
    return std::vector<std::string>{"run",
                                    "lm.yaml",
                                    "methods=" + lora,
                                    "train.steps=4",
                                    "eval.every=0",
                                    "eval.batches=2",
                                    "train.schedule=constant",
                                    "train.warmup_steps=0",
                                    "train.batch_size=4",
                                    "output.dir=" + out,
                                    "--threads",
                                    "1"};
  };
  REQUIRE(graft_cli("run " + base(lora, "ref") + " train.batch_size=4 --nproc 2", w.dir / "log") ==
          0);

  SUBCASE("torchrun") {
    const auto port = std::to_string(free_loopback_port());
    std::vector<pid_t> pids;
    for (int k = 0; k < 2; ++k)
      pids.push_back(start_graft(
          args("torch"), w.dir / ("torch" + std::to_string(k)),
          {"RANK=" + std::to_string(k), "WORLD_SIZE=2", "LOCAL_RANK=" + std::to_string(k),
           "LOCAL_WORLD_SIZE=2", "MASTER_ADDR=127.0.0.1", "MASTER_PORT=" + port}));
    for (auto p : pids) CHECK(wait_for(p) == 0);
    const auto a = adapter("ref"), b = adapter("torch");
    for (const auto& [k, v] : a) CHECK(torch::equal(v, b.at(k)));
    CHECK(io::read_json_file("torch/manifest.json").at("distributed").at("launcher") == "torchrun");
    CHECK(read(w.dir / "torch1").empty());  // ranks other than 0 say nothing when all is well
  }
  SUBCASE("Slurm") {
    const auto port = std::to_string(free_loopback_port());
    std::vector<pid_t> pids;
    for (int k = 0; k < 2; ++k)
      pids.push_back(start_graft(args("slurm"), w.dir / ("slurm" + std::to_string(k)),
                                 {"SLURM_PROCID=" + std::to_string(k), "SLURM_NTASKS=2",
                                  "SLURM_LOCALID=" + std::to_string(k), "SLURM_NTASKS_PER_NODE=2",
                                  "SLURM_JOB_NODELIST=localhost", "MASTER_PORT=" + port}));
    for (auto p : pids) CHECK(wait_for(p) == 0);
    const auto a = adapter("ref"), b = adapter("slurm");
    for (const auto& [k, v] : a) CHECK(torch::equal(v, b.at(k)));
    CHECK(io::read_json_file("slurm/manifest.json").at("distributed").at("launcher") == "slurm");
  }
  SUBCASE("a rank that cannot reach rank 0") {
    const auto port = std::to_string(free_loopback_port());
    const auto pid = start_graft(
        {"run", "lm.yaml", "output.dir=alone", "--rendezvous-timeout", "1"}, w.dir / "alone.log",
        {"RANK=1", "WORLD_SIZE=2", "MASTER_ADDR=127.0.0.1", "MASTER_PORT=" + port});
    CHECK(wait_for(pid) == 1);
    const auto said = read(w.dir / "alone.log");
    CHECK(lines_of(said) == 1);
    CHECK(said.find("rank 1 of 2: could not reach rank 0 at 127.0.0.1:" + port + " within 1 s") !=
          std::string::npos);
    CHECK_FALSE(fs::exists("alone"));
  }
  SUBCASE("a rank that dies") {
    const auto port = std::to_string(free_loopback_port());
    std::vector<pid_t> pids;
    for (int k = 0; k < 2; ++k) {
      std::vector<std::string> env{"RANK=" + std::to_string(k), "WORLD_SIZE=2",
                                   "MASTER_ADDR=127.0.0.1", "MASTER_PORT=" + port};
      if (k == 1) env.push_back("GRAFT_FAILPOINT=step:3");  // SIGKILL as step 3 begins
      pids.push_back(start_graft(args("dies"), w.dir / ("dies" + std::to_string(k)), env));
    }
    CHECK(wait_for(pids[1]) == 128 + SIGKILL);
    CHECK(wait_for(pids[0]) == 1);
    const auto said = read(w.dir / "dies0");
    const auto last = said.substr(said.rfind("graft: error:"));
    CHECK(lines_of(last) == 1);
    CHECK(last.find("rank 0 of 2: lost contact with the other ranks") != std::string::npos);
  }
}

TEST_CASE("graft run --nproc: the launcher's refusals and a failing rank's one line") {
  if (distributed_backends().empty()) return;
  Workspace w;
  InDir in(w.dir);
  const auto log = w.dir / "log";
  CHECK(graft_cli("run lm.yaml train.batch_size=1 output.dir=b1 --nproc 2", log) == 2);
  CHECK(read(log).find("train.batch_size: each of the 2 ranks takes a share of every batch") !=
        std::string::npos);
  CHECK(lines_of(read(log)) == 1);
  CHECK_FALSE(fs::exists("b1"));
  CHECK(graft_cli("run lm.yaml --nproc 0", log) == 2);
  CHECK(read(log).find("--nproc: expected 1 to") != std::string::npos);
}
