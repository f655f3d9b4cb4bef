// A plugin that says it was built against another libtorch.
#include <graft/plugin.h>

static void register_nothing(graft::Registry&) {}

extern "C" __attribute__((visibility("default")))
const GraftPluginDescriptor GRAFT_PLUGIN_SYMBOL = {
    GRAFT_PLUGIN_ABI_VERSION, "oldtorch", "1.0.0", GRAFT_VERSION, "0.4.0", register_nothing};
