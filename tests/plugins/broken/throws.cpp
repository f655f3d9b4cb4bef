// A plugin whose registration throws after registering one method: nothing of it may remain.
#include <graft/plugin.h>

#include <stdexcept>

static void register_and_throw(graft::Registry& r) {
  graft::MethodInfo info;
  info.name = "half_registered";
  r.add(info, [](const graft::Params&) -> std::unique_ptr<graft::Method> { return nullptr; });
  throw std::runtime_error("cannot find my settings file");
}

GRAFT_PLUGIN("throws", "1.0.0", register_and_throw)
