// The plugin ABI: each plugin library exports one versioned descriptor, and graft's loader finds
// and checks it before anything else. Write a plugin with one line:
//
//   GRAFT_PLUGIN("my_method", "1.0.0", register_my_method)   // void (graft::Registry&)
#pragma once

#include <graft/method.h>
#include <graft/version.h>
#include <torch/version.h>

#include <cstdint>
#include <filesystem>
#include <memory>
#include <string>
#include <vector>

/// Bumped whenever the descriptor or any type a plugin sees changes incompatibly.
#define GRAFT_PLUGIN_ABI_VERSION 6u

extern "C" {
/// The exported descriptor. abi_version stays the first field forever, so that any graft can
/// read it from any plugin and refuse a mismatch before touching the rest.
struct GraftPluginDescriptor {
  std::uint32_t abi_version;
  const char* name;
  const char* version;
  const char* core_version;   ///< GRAFT_VERSION the plugin was built against
  const char* torch_version;  ///< TORCH_VERSION the plugin was built against
  void (*register_methods)(graft::Registry&);
};
}

#define GRAFT_PLUGIN_SYMBOL graft_plugin_descriptor

/// Defines the plugin's descriptor. NAME and VERSION are string literals; REGISTER is a function
/// void(graft::Registry&).
#define GRAFT_PLUGIN(NAME, VERSION, REGISTER)         \
  extern "C" __attribute__((visibility("default")))   \
  const GraftPluginDescriptor GRAFT_PLUGIN_SYMBOL = { \
      GRAFT_PLUGIN_ABI_VERSION, NAME, VERSION, GRAFT_VERSION, TORCH_VERSION, REGISTER};

namespace graft {

/// What the loader found in one library.
struct PluginRecord {
  std::filesystem::path file;
  std::string name, version, core_version, torch_version;
  std::vector<std::string> methods;  ///< methods it registered
  std::string error;                 ///< empty when it loaded; else one line with the fix
};

/// A registered method and where it came from.
struct RegisteredMethod {
  MethodInfo info;
  std::filesystem::path file;  ///< the plugin library ("" for methods registered in-process)
};

/// Folders searched for plugins (libgraft_*.so), in order: `extra` (--plugin-dir), each entry of
/// $GRAFT_PLUGIN_PATH, then this graft's own plugins: LIBDIR/graft/plugins beside the running
/// libgraft_core.so for an installation, the build tree's plugins folder for a build.
std::vector<std::filesystem::path> plugin_search_path(
    const std::vector<std::filesystem::path>& extra = {});

/// Loads every plugin on the search path (each file once per process; libraries are never
/// unloaded). A plugin that fails is recorded with its error and skipped; the others load.
const std::vector<PluginRecord>& load_plugins(const std::vector<std::filesystem::path>& extra = {});

/// Loads one library file and returns its record (error filled in on failure).
PluginRecord load_plugin_file(const std::filesystem::path& file);

/// Every method registered so far, by name.
std::vector<RegisteredMethod> registered_methods();

/// Registers a method from inside the process (tests, embedders).
void register_method(MethodInfo info, MethodFactory factory);

/// The foreign adapter formats registered by plugins.
std::vector<AdapterFormat> adapter_formats();

/// Creates a method by name with its settings. An unknown name is an error listing the
/// registered methods (and a did-you-mean), and plugins that failed to load.
std::unique_ptr<Method> make_method(const std::string& name, const Params& params);

}  // namespace graft
