// Built twice (twin_a, twin_b): both register the method "twin", so the second must fail.
#include <graft/plugin.h>

static void register_twin(graft::Registry& r) {
  graft::MethodInfo info;
  info.name = "twin";
  info.version = "1.0.0";
  r.add(info, [](const graft::Params&) -> std::unique_ptr<graft::Method> { return nullptr; });
}

GRAFT_PLUGIN("twin", "1.0.0", register_twin)
