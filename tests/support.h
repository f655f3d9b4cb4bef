// Helpers shared by the test suites: temporary folders, the shared real model and data, and
// skipping a test whose real inputs are absent.
#pragma once

#include <doctest/doctest.h>
#include <graft/load.h>

#include <cstdlib>
#include <filesystem>
#include <iostream>
#include <random>
#include <string>

#include "build_config.h"

namespace graft::test {

/// A fresh folder under the system's temporary directory, removed when the object dies.
class TempDir {
 public:
  TempDir() {
    std::random_device rd;
    path_ = std::filesystem::temp_directory_path() /
            ("graft-test-" + std::to_string(rd()) + std::to_string(rd()));
    std::filesystem::create_directories(path_);
  }
  ~TempDir() {
    std::error_code ec;
    std::filesystem::remove_all(path_, ec);
  }
  const std::filesystem::path& path() const { return path_; }
  std::filesystem::path operator/(const std::string& name) const { return path_ / name; }

 private:
  std::filesystem::path path_;
};

/// The shared folder holding models/ and data/: $GRAFT_SHARED, else ../shared beside the checkout.
inline std::filesystem::path shared_dir() {
  if (const char* env = std::getenv("GRAFT_SHARED")) return env;
  return GRAFT_DEFAULT_SHARED_DIR;
}

/// A model found by name as graft finds it ($GRAFT_MODELS, ../shared/models, the checkout's
/// models/), or an empty path when it is nowhere.
inline std::filesystem::path find_model(const std::string& name) {
  try {
    return graft::resolve_model(name);
  } catch (const std::exception&) {
    return {};
  }
}

/// Ends the current test as skipped, saying why. Under ctest (GRAFT_CTEST=1) the process exits
/// with 77, which ctest reports as "skipped"; run directly, the case just returns early.
#define GRAFT_SKIP_UNLESS_EXISTS(path)                                                         \
  do {                                                                                         \
    if (!std::filesystem::exists(path)) {                                                      \
      std::cout << "SKIPPED: " << (path) << " is absent (set GRAFT_SHARED to the folder with " \
                << "models/ and data/)" << std::endl;                                          \
      MESSAGE("skipped: " << (path) << " is absent");                                          \
      if (std::getenv("GRAFT_CTEST")) std::_Exit(77);                                          \
      return;                                                                                  \
    }                                                                                          \
  } while (0)

}  // namespace graft::test

/// Sets `var` to the model called `name`, or ends the test as skipped saying where to put it.
#define GRAFT_MODEL_OR_SKIP(var, name)                                                           \
  const auto var = ::graft::test::find_model(name);                                              \
  do {                                                                                           \
    if (var.empty()) {                                                                           \
      std::cout << "SKIPPED: the model " << (name) << " is not found (put it in models/ of the " \
                << "checkout, or set GRAFT_MODELS; see README.md)" << std::endl;                 \
      MESSAGE("skipped: the model " << (name) << " is not found");                               \
      if (std::getenv("GRAFT_CTEST")) std::_Exit(77);                                            \
      return;                                                                                    \
    }                                                                                            \
  } while (0)
