// A plugin built for another ABI version: the loader must refuse it before reading further.
#include <graft/plugin.h>

static void register_nothing(graft::Registry&) {}

extern "C" __attribute__((visibility("default")))
const GraftPluginDescriptor GRAFT_PLUGIN_SYMBOL = {999u,    "future",      "9.9.9",
                                                   "9.9.9", TORCH_VERSION, register_nothing};
