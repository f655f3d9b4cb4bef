// The process group of a distributed run on libtorch's c10d: a TCPStore rendezvous, then Gloo
// (CPU, and CUDA tensors where libtorch's Gloo has them) or NCCL (CUDA). Built with Gloo only
// where the build found Gloo's headers (GRAFT_HAVE_GLOO); otherwise only groups of one process.
#include <arpa/inet.h>
#include <graft/distributed.h>
#include <graft/error.h>
#include <netdb.h>
#include <sys/socket.h>
#include <torch/cuda.h>
#include <unistd.h>

#include <cstdlib>
#include <stdexcept>
#include <thread>

#if GRAFT_HAVE_GLOO
#include <torch/csrc/distributed/c10d/ProcessGroupGloo.hpp>
#include <torch/csrc/distributed/c10d/TCPStore.hpp>
#endif
#if GRAFT_HAVE_NCCL
#include <torch/csrc/distributed/c10d/ProcessGroupNCCL.hpp>
#endif

namespace graft {

std::vector<std::string> distributed_backends() {
  std::vector<std::string> out;
#if GRAFT_HAVE_GLOO
  out.emplace_back("gloo");
#endif
#if GRAFT_HAVE_NCCL
  out.emplace_back("nccl");
#endif
  return out;
}

void require_distributed(const std::string& what) {
  if (distributed_backends().empty())
    throw Error(what +
                ": this graft was built without distributed training (libtorch's c10d Gloo "
                "backend or Gloo's headers were not found at build time: install libgloo-dev and "
                "build again)");
}

namespace {

// A run of one process: nothing to exchange.
class Alone final : public ProcessGroup {
 public:
  Alone() : ProcessGroup(0, 1, "none") {}
  struct Done final : Pending {
    void wait() override {}
  };
  std::unique_ptr<Pending> allreduce_sum_async(at::Tensor&) override {
    return std::make_unique<Done>();
  }
  void broadcast(at::Tensor&, int) override {}
  void barrier() override {}
};

std::string where(const Launch& l) { return l.master_addr + ":" + std::to_string(l.master_port); }

std::string seconds(std::chrono::milliseconds t) {
  return std::to_string((t.count() + 999) / 1000) + " s";
}

#if GRAFT_HAVE_GLOO

// The first line of a c10d error, without its C++ backtrace.
std::string first_line(const std::exception& e) {
  const auto* c10 = dynamic_cast<const c10::Error*>(&e);
  std::string s = c10 ? c10->what_without_backtrace() : e.what();
  const auto nl = s.find('\n');
  return nl == std::string::npos ? s : s.substr(0, nl);
}

// Waits until something accepts connections at the launch's address (rank 0's store), so that a
// rank that cannot reach it says so in graft's words, not c10d's.
void reach(const Launch& l, std::chrono::milliseconds timeout) {
  const auto deadline = std::chrono::steady_clock::now() + timeout;
  addrinfo hints{};
  hints.ai_family = AF_UNSPEC;
  hints.ai_socktype = SOCK_STREAM;
  const auto port = std::to_string(l.master_port);
  for (;;) {
    addrinfo* found = nullptr;
    if (getaddrinfo(l.master_addr.c_str(), port.c_str(), &hints, &found) == 0) {
      for (auto* a = found; a; a = a->ai_next) {
        const int fd = socket(a->ai_family, a->ai_socktype, a->ai_protocol);
        if (fd < 0) continue;
        const bool ok = connect(fd, a->ai_addr, a->ai_addrlen) == 0;
        close(fd);
        if (ok) {
          freeaddrinfo(found);
          return;
        }
      }
      freeaddrinfo(found);
    }
    if (std::chrono::steady_clock::now() >= deadline)
      throw SystemError("rank " + std::to_string(l.rank) + " of " + std::to_string(l.world_size) +
                        ": could not reach rank 0 at " + where(l) + " within " + seconds(timeout) +
                        " (MASTER_ADDR, MASTER_PORT; is rank 0 running?)");
    std::this_thread::sleep_for(std::chrono::milliseconds(100));
  }
}

template <typename Backend>
class C10dGroup final : public ProcessGroup {
 public:
  C10dGroup(const Launch& l, std::string name, c10::intrusive_ptr<c10d::Store> store,
            c10::intrusive_ptr<Backend> backend, const torch::Device& device)
      : ProcessGroup(l.rank, l.world_size, std::move(name)),
        store_(std::move(store)),
        pg_(std::move(backend)),
        device_(device) {}

  struct Work final : Pending {
    Work(c10::intrusive_ptr<c10d::Work> w, const C10dGroup* g) : work(std::move(w)), group(g) {}
    void wait() override {
      try {
        work->wait();
      } catch (const std::exception& e) {
        group->lost(e);
      }
    }
    c10::intrusive_ptr<c10d::Work> work;
    const C10dGroup* group;
  };

  std::unique_ptr<Pending> allreduce_sum_async(at::Tensor& tensor) override {
    std::vector<at::Tensor> v{tensor};
    c10d::AllreduceOptions o;
    o.reduceOp = c10d::ReduceOp::SUM;
    try {
      return std::make_unique<Work>(pg_->allreduce(v, o), this);
    } catch (const std::exception& e) {
      lost(e);
    }
  }
  void broadcast(at::Tensor& tensor, int root) override {
    std::vector<at::Tensor> v{tensor};
    c10d::BroadcastOptions o;
    o.rootRank = root;
    try {
      Work(pg_->broadcast(v, o), this).wait();
    } catch (const Error&) {
      throw;
    } catch (const std::exception& e) {
      lost(e);
    }
  }
  void barrier() override {  // a one-element sum: the same on every backend
    auto one = torch::ones({1}, torch::TensorOptions().device(device_));
    allreduce_sum(one);
  }

  [[noreturn]] void lost(const std::exception& e) const {
    throw SystemError("rank " + std::to_string(rank()) + " of " + std::to_string(size()) +
                      ": lost contact with the other ranks (" + first_line(e) +
                      "); a rank stopped or its machine cannot be reached");
  }

 private:
  c10::intrusive_ptr<c10d::Store> store_;
  c10::intrusive_ptr<Backend> pg_;
  torch::Device device_;
};

c10::intrusive_ptr<c10d::Store> rendezvous(const Launch& l, std::chrono::milliseconds timeout) {
  const auto who = "rank " + std::to_string(l.rank) + " of " + std::to_string(l.world_size);
  if (l.rank != 0) reach(l, timeout);
  c10d::TCPStoreOptions o;
  o.port = static_cast<std::uint16_t>(l.master_port);
  o.isServer = l.rank == 0;
  o.numWorkers = static_cast<std::size_t>(l.world_size);
  o.waitWorkers = true;
  o.timeout = timeout;
  try {
    return c10::make_intrusive<c10d::TCPStore>(l.master_addr, o);
  } catch (const std::exception& e) {
    if (l.rank == 0)
      throw SystemError(who + ": the other ranks did not all join at " + where(l) + " within " +
                        seconds(timeout) + " (" + first_line(e) + ")");
    throw SystemError(who + ": could not join the run at " + where(l) + " (" + first_line(e) + ")");
  }
}

std::shared_ptr<::gloo::transport::Device> gloo_device(const Launch& l) {
  if (const char* ifname = std::getenv("GLOO_SOCKET_IFNAME"))
    return c10d::ProcessGroupGloo::createDeviceForInterface(ifname);
  const auto& a = l.master_addr;
  if (a == "localhost" || a == "::1" || a.rfind("127.", 0) == 0)
    return c10d::ProcessGroupGloo::createDeviceForHostname("127.0.0.1");
  return c10d::ProcessGroupGloo::createDefaultDevice();
}

#endif  // GRAFT_HAVE_GLOO

}  // namespace

std::unique_ptr<ProcessGroup> ProcessGroup::join(const Launch& l, const torch::Device& device,
                                                 std::chrono::milliseconds timeout) {
  if (!l.distributed()) return std::make_unique<Alone>();
#if GRAFT_HAVE_GLOO
  // GRAFT_DIST_BACKEND=gloo keeps CUDA tensors on Gloo (several ranks sharing one GPU, which
  // NCCL refuses); =nccl insists on NCCL.
  const char* asked = std::getenv("GRAFT_DIST_BACKEND");
  const std::string backend = asked ? asked : "";
  if (!backend.empty() && backend != "gloo" && backend != "nccl")
    throw Error("GRAFT_DIST_BACKEND=" + backend + ": expected gloo or nccl");
  if (backend == "nccl" && (!GRAFT_HAVE_NCCL || !device.is_cuda()))
    throw Error("GRAFT_DIST_BACKEND=nccl: NCCL needs a CUDA device and a graft built with NCCL");
#if GRAFT_HAVE_NCCL
  const bool nccl = device.is_cuda() && backend != "gloo";
  const auto gpus = static_cast<int>(torch::cuda::device_count());
  if (nccl && l.local_world_size > gpus)  // NCCL refuses two ranks on one GPU, late and vaguely
    throw Error(std::to_string(l.local_world_size) + " ranks on this machine share its " +
                std::to_string(gpus) + " GPU" + (gpus == 1 ? "" : "s") +
                ": NCCL needs a GPU per rank; start fewer ranks, or set GRAFT_DIST_BACKEND=gloo");
#endif
  auto store = rendezvous(l, timeout);
  try {
#if GRAFT_HAVE_NCCL
    if (nccl) {
      auto o = c10d::ProcessGroupNCCL::Options::create();
      auto pg = c10::make_intrusive<c10d::ProcessGroupNCCL>(store, l.rank, l.world_size, o);
      return std::make_unique<C10dGroup<c10d::ProcessGroupNCCL>>(l, "nccl", store, pg, device);
    }
#endif
    auto o = c10d::ProcessGroupGloo::Options::create();
    o->devices.push_back(gloo_device(l));
    auto pg = c10::make_intrusive<c10d::ProcessGroupGloo>(store, l.rank, l.world_size, o);
    return std::make_unique<C10dGroup<c10d::ProcessGroupGloo>>(l, "gloo", store, pg, device);
  } catch (const std::exception& e) {
    throw SystemError("rank " + std::to_string(l.rank) + " of " + std::to_string(l.world_size) +
                      ": could not connect to the other ranks (" + first_line(e) + ")");
  }
#else
  (void)device;
  (void)timeout;
  require_distributed("WORLD_SIZE " + std::to_string(l.world_size));  // throws: no backend here
  throw std::logic_error("distributed_backends() lists a backend this build left out");
#endif
}

}  // namespace graft
