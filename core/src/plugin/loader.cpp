// Finding, checking and loading plugin libraries with Boost.DLL, and the method registry.
#include <dlfcn.h>
#include <graft/plugin.h>

#include <algorithm>
#include <boost/dll/shared_library.hpp>
#include <cstdlib>
#include <iostream>
#include <map>
#include <mutex>
#include <set>
#include <sstream>

#include "build_config.h"

namespace graft {
namespace fs = std::filesystem;

namespace {

struct Entry {
  MethodInfo info;
  MethodFactory factory;
  fs::path file;
};

struct State {
  std::mutex mutex;
  std::map<std::string, Entry> methods;
  std::vector<AdapterFormat> formats;
  std::vector<PluginRecord> records;
  std::set<std::string> seen;  // canonical paths already tried
  // Libraries stay loaded for the life of the process: libtorch code does not survive unloading.
  std::vector<std::shared_ptr<boost::dll::shared_library>> libraries;
};

State& state() {
  static State* s = new State;  // never destroyed: plugin code may run during static teardown
  return *s;
}

class RegistryFor : public Registry {
 public:
  RegistryFor(fs::path file, std::shared_ptr<boost::dll::shared_library> lib)
      : file_(std::move(file)), lib_(std::move(lib)) {}
  void add(MethodInfo info, MethodFactory factory) override {
    auto& s = state();
    if (info.name.empty()) throw Error("a method has an empty name");
    auto it = s.methods.find(info.name);
    if (it != s.methods.end())
      throw Error(
          "method '" + info.name + "' is already registered by " +
          (it->second.file.empty() ? std::string("graft itself") : it->second.file.string()) +
          "; remove one of the two plugins or rename the method");
    added.push_back(info.name);
    // The factory keeps the library alive for as long as it (and what it makes) may run.
    auto lib = lib_;
    MethodFactory wrapped = [factory = std::move(factory), lib](const Params& p) {
      return factory(p);
    };
    const std::string name = info.name;  // before info is moved into the entry
    s.methods.emplace(name, Entry{std::move(info), std::move(wrapped), file_});
  }
  void add_format(AdapterFormat format) override {
    auto& s = state();
    for (const auto& f : s.formats)
      if (f.name == format.name && f.method == format.method)
        throw Error("the " + format.name + " format of method '" + format.method +
                    "' is already registered");
    formats_added.push_back(format.name + "/" + format.method);
    s.formats.push_back(std::move(format));
  }
  std::vector<std::string> added, formats_added;

 private:
  fs::path file_;
  std::shared_ptr<boost::dll::shared_library> lib_;
};

void forget_formats(const std::vector<std::string>& keys) {
  auto& f = state().formats;
  f.erase(std::remove_if(f.begin(), f.end(),
                         [&](const AdapterFormat& x) {
                           return std::find(keys.begin(), keys.end(), x.name + "/" + x.method) !=
                                  keys.end();
                         }),
          f.end());
}

// $GRAFT_PLUGIN_PATH's folders. A relative entry (or an empty one, which the shell convention
// reads as the current folder) would load code from wherever a command is run: such entries are
// skipped, with a warning (once per process).
void split_path_list(const char* env, std::vector<fs::path>& out) {
  if (!env) return;
  std::stringstream ss(env);
  std::string item;
  static bool warned = false;
  while (std::getline(ss, item, ':')) {
    if (!item.empty() && fs::path(item).is_absolute()) {
      out.emplace_back(item);
    } else if (!warned) {
      warned = true;
      std::cerr << "graft: warning: GRAFT_PLUGIN_PATH entry \"" << item
                << "\" is not an absolute folder; skipped (plugins load only from absolute "
                   "folders)\n";
    }
  }
}

}  // namespace

std::vector<fs::path> plugin_search_path(const std::vector<fs::path>& extra) {
  std::vector<fs::path> dirs = extra;
  split_path_list(std::getenv("GRAFT_PLUGIN_PATH"), dirs);
  // The plugins that belong to this graft, and no other's: an installation's are in
  // LIBDIR/graft/plugins beside the libgraft_core.so that is running (wherever the prefix was
  // moved); a graft run from its build tree has its build's plugins folder. An installed graft
  // never loads a build tree's plugins (another version, perhaps), nor the reverse.
  Dl_info info{};
  fs::path own = GRAFT_BUILD_PLUGIN_DIR;
  if (::dladdr(reinterpret_cast<void*>(&load_plugin_file), &info) && info.dli_fname) {
    auto installed = fs::path(info.dli_fname).parent_path() / "graft" / "plugins";
    std::error_code ec;
    if (fs::is_directory(installed, ec)) own = fs::weakly_canonical(installed, ec);
  }
  if (std::find(dirs.begin(), dirs.end(), own) == dirs.end()) dirs.push_back(own);
  return dirs;
}

PluginRecord load_plugin_file(const fs::path& file) {
  auto& s = state();
  PluginRecord rec;
  rec.file = file;
  auto lib = std::make_shared<boost::dll::shared_library>();
  boost::system::error_code ec;
  lib->load(file.string(), boost::dll::load_mode::rtld_lazy | boost::dll::load_mode::rtld_local,
            ec);
  if (ec) {
    rec.error = "cannot load: " + ec.message() +
                " (rebuild the plugin against this graft, or remove it from the plugin path)";
    return rec;
  }
  if (!lib->has(BOOST_STRINGIZE(GRAFT_PLUGIN_SYMBOL))) {
    rec.error = "not a graft plugin: it exports no " BOOST_STRINGIZE(
        GRAFT_PLUGIN_SYMBOL) " (define one with GRAFT_PLUGIN(name, version, register_function))";
    return rec;
  }
  const auto& d = lib->get<const GraftPluginDescriptor>(BOOST_STRINGIZE(GRAFT_PLUGIN_SYMBOL));
  if (d.abi_version != GRAFT_PLUGIN_ABI_VERSION) {
    rec.error = "plugin ABI version " + std::to_string(d.abi_version) + ", but this graft " +
                GRAFT_VERSION " loads ABI version " + std::to_string(GRAFT_PLUGIN_ABI_VERSION) +
                "; rebuild the plugin against this graft";
    return rec;
  }
  rec.name = d.name ? d.name : "";
  rec.version = d.version ? d.version : "";
  rec.core_version = d.core_version ? d.core_version : "";
  rec.torch_version = d.torch_version ? d.torch_version : "";
  if (rec.torch_version != TORCH_VERSION) {
    rec.error = "built against libtorch " + rec.torch_version + ", but this graft uses libtorch " +
                TORCH_VERSION + "; rebuild the plugin against this graft";
    return rec;
  }
  if (!d.register_methods) {
    rec.error = "its descriptor has no registration function";
    return rec;
  }
  RegistryFor registry(file, lib);
  try {
    d.register_methods(registry);
  } catch (const std::exception& e) {
    for (const auto& name : registry.added) s.methods.erase(name);
    forget_formats(registry.formats_added);
    rec.error = std::string("registration failed: ") + e.what();
    return rec;
  } catch (...) {
    for (const auto& name : registry.added) s.methods.erase(name);
    forget_formats(registry.formats_added);
    rec.error = "registration failed with an unknown exception";
    return rec;
  }
  rec.methods = registry.added;
  s.libraries.push_back(lib);
  return rec;
}

const std::vector<PluginRecord>& load_plugins(const std::vector<fs::path>& extra) {
  auto& s = state();
  std::lock_guard<std::mutex> lock(s.mutex);
  for (const auto& dir : plugin_search_path(extra)) {
    std::error_code ec;
    if (!fs::is_directory(dir, ec)) continue;
    std::vector<fs::path> files;
    for (const auto& e : fs::directory_iterator(dir, ec)) {
      const auto name = e.path().filename().string();
      if (name.rfind("libgraft_", 0) == 0 && e.path().extension() == ".so")
        files.push_back(e.path());
    }
    std::sort(files.begin(), files.end());
    for (const auto& f : files) {
      const auto key = fs::weakly_canonical(f, ec).string();
      // The first copy of a plugin on the search path wins, as with PATH.
      const auto base = f.filename().string();
      if (!s.seen.insert(key).second || !s.seen.insert("name:" + base).second) continue;
      s.records.push_back(load_plugin_file(f));
    }
  }
  return s.records;
}

std::vector<RegisteredMethod> registered_methods() {
  std::vector<RegisteredMethod> out;
  for (const auto& [name, e] : state().methods) out.push_back({e.info, e.file});
  return out;
}

std::vector<AdapterFormat> adapter_formats() { return state().formats; }

void register_method(MethodInfo info, MethodFactory factory) {
  RegistryFor registry("", nullptr);
  registry.add(std::move(info), std::move(factory));
}

std::unique_ptr<Method> make_method(const std::string& name, const Params& params) {
  auto& s = state();
  auto it = s.methods.find(name);
  if (it == s.methods.end()) {
    std::vector<std::string> names;
    for (const auto& [n, e] : s.methods) names.push_back(n);
    std::string list;
    for (const auto& n : names) list += (list.empty() ? "" : ", ") + n;
    std::string msg = "unknown method \"" + name + "\"";
    auto near = did_you_mean(name, names);
    if (!near.empty()) msg += " (did you mean \"" + near + "\"?)";
    msg += names.empty()
               ? "; no methods are registered (is the plugin folder on GRAFT_PLUGIN_PATH?)"
               : "; registered: " + list;
    for (const auto& r : s.records)
      if (!r.error.empty()) msg += "; note: " + r.file.filename().string() + " failed to load";
    Params where = params;
    if (!where.is_null() && where.has("name")) where.at("name").fail(msg);
    throw Error(msg);
  }
  try {
    return it->second.factory(params);
  } catch (const ParamError&) {
    throw;
  } catch (const Error&) {
    throw;
  } catch (const std::exception& e) {
    throw Error(name + " (" + it->second.file.filename().string() + "): " + e.what());
  }
}

}  // namespace graft
