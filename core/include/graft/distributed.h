// Distributed data-parallel training on libtorch's c10d: where a process sits in a run of several
// (its launch, from graft's own launcher, torchrun's environment or Slurm's), and the process
// group the ranks of a run share (Gloo on CPU, NCCL on CUDA where libtorch has it).
//
// A run of N ranks trains what one process trains: every rank reads the same recipe and data,
// takes its share of each global batch, and the trainable tensors' gradients are summed across
// the ranks before every optimizer step (docs/distributed.md).
#pragma once

#include <torch/types.h>

#include <chrono>
#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <vector>

namespace graft {

/// Where this process sits in a run, as its launcher described it.
struct Launch {
  int rank = 0;                           ///< 0 .. world_size - 1; rank 0 writes the run folder
  int world_size = 1;                     ///< processes in the run
  int local_rank = 0;                     ///< rank among the processes on this machine
  int local_world_size = 1;               ///< processes on this machine
  std::string master_addr = "127.0.0.1";  ///< where rank 0 listens for the others
  int master_port = 29500;
  /// Who started the process: "" (on its own), "graft" (graft run --nproc), "torchrun",
  /// "slurm".
  std::string launcher;
  bool distributed() const { return world_size > 1; }
};

/// The launch the environment describes: torchrun's variables (RANK, WORLD_SIZE, LOCAL_RANK,
/// LOCAL_WORLD_SIZE, MASTER_ADDR, MASTER_PORT; graft's launcher sets the same), else Slurm's
/// (SLURM_PROCID, SLURM_NTASKS, SLURM_LOCALID, SLURM_NTASKS_PER_NODE, the first host of
/// SLURM_JOB_NODELIST; MASTER_ADDR and MASTER_PORT win when set, else the port is 20000 plus
/// SLURM_JOB_ID modulo 20000), else one process. An incomplete or inconsistent set is an Error
/// naming the variable. `env` looks a variable up (std::getenv by default; tests pass their own).
Launch launch_from_environment(const std::function<const char*(const char*)>& env =
                                   [](const char* name) {
                                     return static_cast<const char*>(std::getenv(name));
                                   });

/// The first host of a Slurm node list ("node[03-05,9],gpu1" -> "node03").
std::string first_slurm_host(const std::string& nodelist);

/// A TCP port on 127.0.0.1 that nothing listens on now (for a launcher's MASTER_PORT), or a
/// SystemError.
int free_loopback_port();

/// The backends this build of graft can use ("gloo", "nccl"); empty when libtorch's c10d or
/// Gloo's headers were missing at build time (distributed runs are then refused).
std::vector<std::string> distributed_backends();

/// Nothing where this build can run distributed; else an Error: "<what>: this graft was built
/// without distributed training (...)", the one refusal `--nproc`, `trial_nproc` and a launcher's
/// WORLD_SIZE above 1 share.
void require_distributed(const std::string& what);

/// The ranks of a run, joined through a c10d TCPStore at the launch's address. Every rank must
/// make the same calls in the same order. A failure of a collective (a rank that died, a machine
/// gone) is an Error saying so in one line. A group of one process does no communication.
class ProcessGroup {
 public:
  /// Joins the run: rank 0 listens at master_addr:master_port, the others connect, waiting at
  /// most `timeout` for all to arrive (an Error naming the address otherwise). The backend is
  /// NCCL for a CUDA device where libtorch has it, else Gloo.
  static std::unique_ptr<ProcessGroup> join(const Launch& launch, const torch::Device& device,
                                            std::chrono::milliseconds timeout);
  virtual ~ProcessGroup() = default;

  int rank() const { return rank_; }
  int size() const { return size_; }
  const std::string& backend() const { return backend_; }

  /// A collective started and not yet waited for.
  class Pending {
   public:
    virtual ~Pending() = default;
    virtual void wait() = 0;
  };

  /// Sums the tensor over the ranks, in place, in the background; wait() before reading it.
  virtual std::unique_ptr<Pending> allreduce_sum_async(at::Tensor& tensor) = 0;
  /// Sums the tensor over the ranks, in place.
  void allreduce_sum(at::Tensor& tensor) { allreduce_sum_async(tensor)->wait(); }
  /// Rank `root`'s tensor on every rank (in place).
  virtual void broadcast(at::Tensor& tensor, int root) = 0;
  /// Returns when every rank has called it.
  virtual void barrier() = 0;

 protected:
  ProcessGroup(int rank, int size, std::string backend)
      : rank_(rank), size_(size), backend_(std::move(backend)) {}

 private:
  int rank_, size_;
  std::string backend_;
};

}  // namespace graft
