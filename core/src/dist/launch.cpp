// Where a process sits in a distributed run: torchrun's environment, Slurm's, or neither.
#include <graft/distributed.h>
#include <graft/error.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <unistd.h>

#include <cctype>
#include <cerrno>
#include <cstring>
#include <string>

namespace graft {

namespace {

// A variable holding a whole number in [lo, hi], or an Error naming it.
int whole(const std::function<const char*(const char*)>& env, const char* name, int lo, int hi) {
  const char* v = env(name);
  if (!v)
    throw Error(std::string("the environment sets ") + name + "'s companions but not " + name +
                " (a launcher sets them all)");
  const std::string s = v;
  std::size_t used = 0;
  long n = -1;
  try {
    n = std::stol(s, &used);
  } catch (const std::exception&) {
    used = 0;
  }
  if (s.empty() || used != s.size() || n < lo || n > hi)
    throw Error(std::string(name) + "=" + s + ": expected a whole number from " +
                std::to_string(lo) + " to " + std::to_string(hi));
  return static_cast<int>(n);
}

}  // namespace

std::string first_slurm_host(const std::string& nodelist) {
  // The first entry (commas inside brackets separate ranges, not hosts), with each bracketed
  // range replaced by its first member: "rack[1-2]-n[07,9]" -> "rack1-n07".
  std::string out;
  for (std::size_t i = 0; i < nodelist.size(); ++i) {
    const char c = nodelist[i];
    if (c == ',') break;
    if (c != '[') {
      out += c;
      continue;
    }
    const auto close = nodelist.find(']', i);
    if (close == std::string::npos) throw Error("SLURM_JOB_NODELIST=" + nodelist + ": unclosed [");
    const auto inner = nodelist.substr(i + 1, close - i - 1);
    const auto end = inner.find_first_of(",-");
    out += inner.substr(0, end);
    i = close;
  }
  if (out.empty()) throw Error("SLURM_JOB_NODELIST is empty");
  return out;
}

int free_loopback_port() {
  const int fd = socket(AF_INET, SOCK_STREAM, 0);
  sockaddr_in a{};
  a.sin_family = AF_INET;
  a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  socklen_t len = sizeof a;
  if (fd < 0 || bind(fd, reinterpret_cast<sockaddr*>(&a), sizeof a) != 0 ||
      getsockname(fd, reinterpret_cast<sockaddr*>(&a), &len) != 0) {
    const std::string why = std::strerror(errno);
    if (fd >= 0) close(fd);
    throw SystemError("cannot find a free port on 127.0.0.1: " + why);
  }
  close(fd);
  return ntohs(a.sin_port);
}

Launch launch_from_environment(const std::function<const char*(const char*)>& env) {
  Launch l;
  auto text = [&](const char* name, const std::string& otherwise) {
    const char* v = env(name);
    return v && *v ? std::string(v) : otherwise;
  };
  constexpr int kMaxRanks = 1 << 20;
  if (env("RANK") || env("WORLD_SIZE")) {  // torchrun (or graft run --nproc)
    l.world_size = whole(env, "WORLD_SIZE", 1, kMaxRanks);
    l.rank = whole(env, "RANK", 0, l.world_size - 1);
    l.local_rank = env("LOCAL_RANK") ? whole(env, "LOCAL_RANK", 0, l.world_size - 1) : l.rank;
    l.local_world_size = env("LOCAL_WORLD_SIZE")
                             ? whole(env, "LOCAL_WORLD_SIZE", l.local_rank + 1, l.world_size)
                             : l.world_size;
    if (l.world_size > 1 && (!env("MASTER_ADDR") || !env("MASTER_PORT")))
      throw Error(std::string("WORLD_SIZE=") + env("WORLD_SIZE") +
                  " needs MASTER_ADDR and MASTER_PORT: where rank 0 listens");
    l.master_addr = text("MASTER_ADDR", l.master_addr);
    if (env("MASTER_PORT")) l.master_port = whole(env, "MASTER_PORT", 1, 65535);
    l.launcher = text("GRAFT_LAUNCHER", "torchrun");
    return l;
  }
  if (env("SLURM_PROCID") && env("SLURM_NTASKS")) {  // srun
    l.world_size = whole(env, "SLURM_NTASKS", 1, kMaxRanks);
    l.rank = whole(env, "SLURM_PROCID", 0, l.world_size - 1);
    l.local_rank = env("SLURM_LOCALID") ? whole(env, "SLURM_LOCALID", 0, l.world_size - 1) : 0;
    l.local_world_size = env("SLURM_NTASKS_PER_NODE")
                             ? whole(env, "SLURM_NTASKS_PER_NODE", 1, l.world_size)
                             : 1;  // unknown: Slurm binds each task to its own CPUs anyway
    l.launcher = "slurm";
    if (l.world_size == 1) return l;
    if (env("MASTER_ADDR")) {
      l.master_addr = text("MASTER_ADDR", l.master_addr);
    } else {
      const char* nodes =
          env("SLURM_JOB_NODELIST") ? env("SLURM_JOB_NODELIST") : env("SLURM_NODELIST");
      if (!nodes)
        throw Error("SLURM_NTASKS=" + std::to_string(l.world_size) +
                    " without SLURM_JOB_NODELIST or MASTER_ADDR: where does rank 0 run?");
      l.master_addr = first_slurm_host(nodes);
    }
    if (env("MASTER_PORT"))
      l.master_port = whole(env, "MASTER_PORT", 1, 65535);
    else if (env("SLURM_JOB_ID"))
      l.master_port = 20000 + whole(env, "SLURM_JOB_ID", 0, 2147483647) % 20000;
    return l;
  }
  return l;
}

}  // namespace graft
