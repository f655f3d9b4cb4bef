// The plugin loader: good plugins load, and each kind of broken plugin is refused with one line
// naming the file and the fix, without stopping the others.
#include <graft/plugin.h>

#include <map>

#include "support.h"
#include "test_config.h"

using namespace graft;

TEST_CASE("the loader refuses broken plugins one by one and keeps the good ones") {
  load_plugins();  // the good ones, from the build's plugin folder
  const auto& records = load_plugins({GRAFT_BROKEN_PLUGIN_DIR});
  std::map<std::string, std::string> errors;
  for (const auto& r : records) errors[r.file.filename().string()] = r.error;

  CHECK(errors.at("libgraft_lora.so").empty());
  CHECK(errors.at("libgraft_full.so").empty());
  CHECK(errors.at("libgraft_abi.so") ==
        "plugin ABI version 999, but this graft " GRAFT_VERSION " loads ABI version " +
            std::to_string(GRAFT_PLUGIN_ABI_VERSION) + "; rebuild the plugin against this graft");
  CHECK_MESSAGE(errors.at("libgraft_torch_version.so").find("built against libtorch 0.4.0") !=
                    std::string::npos,
                errors.at("libgraft_torch_version.so"));
  CHECK_MESSAGE(
      errors.at("libgraft_no_descriptor.so").find("not a graft plugin") != std::string::npos,
      errors.at("libgraft_no_descriptor.so"));
  CHECK_MESSAGE(
      errors.at("libgraft_throws.so") == "registration failed: cannot find my settings file",
      errors.at("libgraft_throws.so"));
  CHECK(errors.at("libgraft_twin_a.so").empty());
  CHECK_MESSAGE(errors.at("libgraft_twin_b.so").find("method 'twin' is already registered by") !=
                    std::string::npos,
                errors.at("libgraft_twin_b.so"));
  CHECK_MESSAGE(errors.at("libgraft_garbage.so").find("cannot load") != std::string::npos,
                errors.at("libgraft_garbage.so"));

  std::map<std::string, RegisteredMethod> methods;
  for (const auto& m : registered_methods()) methods[m.info.name] = m;
  CHECK(methods.count("lora"));
  CHECK(methods.count("full"));
  CHECK(methods.count("twin"));
  CHECK_FALSE(methods.count("half_registered"));  // the throwing plugin left nothing behind
  CHECK(methods.at("lora").file.filename() == "libgraft_lora.so");
  CHECK(methods.at("lora").info.mergeable);

  // Loading again does not load anything twice.
  const auto n = load_plugins({GRAFT_BROKEN_PLUGIN_DIR}).size();
  CHECK(n == records.size());
  CHECK_THROWS_WITH_AS(make_method("nonesuch", Params()), doctest::Contains("failed to load"),
                       Error);
}
